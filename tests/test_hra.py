"""HRA (Householder reflection adaptation) against HF PEFT: files both ways, outputs, gradients, merging,
several adapters, init, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods.hra import HRAConfig  # noqa: E402

ATOL = 1e-5

CASES = {
    "mlp": ("mlp", dict(r=4, target_modules=["lin0", "lin1"])),
    "mlp_gs": ("mlp", dict(r=3, target_modules=["lin0", "lin1"], apply_GS=True, init_weights=False)),
    "mlp_random": ("mlp", dict(r=5, target_modules=["lin1"], init_weights=False)),
    "conv2d": ("conv2d", dict(r=4, target_modules=["conv0"])),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4)),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=4)),  # default targets: q, v
}


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    return (HRAConfig if lib is fastpeft else lib.HRAConfig)(**kw)


def base(case):
    return models.MODELS[CASES[case][0]][0]()


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    model = lib.get_peft_model(base(case), config(lib, case, **extra))
    return models.perturb(model, seed, 0.1).eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def differs(a, b):
    assert (a - b).abs().max().item() > 1e-4, "the adapter does not change the outputs"


def same_pair(case, **extra):
    """HF model with perturbed vectors and a fastpeft model given the same vectors through HF's state dict."""
    hf = build(peft, case, **extra)
    fp = fastpeft.get_peft_model(base(case), config(fastpeft, case, **extra)).eval()
    result = fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf))
    assert not result.missing_keys and not result.unexpected_keys
    return hf, fp


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    hf = build(peft, case)
    expected = models.forward(hf, inputs(case))
    differs(expected, models.forward(base(case), inputs(case)))
    hf.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(base(case), str(tmp_path)).eval()
    close(models.forward(fp, inputs(case)), expected, "fastpeft(HF adapter) vs HF")
    hf_file = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = fastpeft.get_peft_model_state_dict(fp)
    assert set(ours) == set(hf_file) and all(k.endswith("hra_u") for k in ours)
    for k in hf_file:
        assert torch.equal(ours[k], hf_file[k]), k


@pytest.mark.parametrize("case", [c for c in CASES if c != "llama_all_linear"])
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    fp = build(fastpeft, case)
    expected = models.forward(fp, inputs(case))
    fp.save_pretrained(str(tmp_path / "fp"))
    hf = peft.PeftModel.from_pretrained(base(case), str(tmp_path / "fp")).eval()
    close(models.forward(hf, inputs(case)), expected, "HF(fastpeft adapter) vs fastpeft")
    build(peft, case).save_pretrained(str(tmp_path / "hf"))  # same perturbation, same names -> same file
    fp_sd, hf_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("fp", "hf"))
    assert set(fp_sd) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k
    fp_cfg, hf_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fp", "hf"))
    for cfg in (fp_cfg, hf_cfg):
        cfg.pop("peft_version")
        cfg["target_modules"] = sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], list) else None
    assert fp_cfg == hf_cfg


@pytest.mark.parametrize("case", ["mlp", "mlp_random", "conv2d", "llama"])
def test_init_matches_hf(case):
    """Same seed -> the same vectors (symmetric pairs for even r, so the identity at start)."""
    torch.manual_seed(3)
    hf = peft.get_peft_model(base(case), config(peft, case))
    torch.manual_seed(3)
    fp = fastpeft.get_peft_model(base(case), config(fastpeft, case))
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf), fastpeft.get_peft_model_state_dict(fp)
    assert set(hf_sd) == set(fp_sd)
    for k in hf_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k
    if CASES[case][1].get("init_weights", True):
        close(models.forward(fp.eval(), inputs(case)), models.forward(base(case), inputs(case)), "identity")


def _grads(model, lib):
    return lib.get_peft_model_state_dict(
        model, state_dict={n: p.grad for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("case", ["mlp", "mlp_gs", "conv2d", "t5"])
def test_training_step_gradients_match_hf(case):
    hf, fp = same_pair(case)
    x = inputs(case)
    for model in (hf, fp):
        model.train()
        torch.manual_seed(1)  # the same dropout masks (T5) in both libraries
        out = model(**x) if isinstance(x, dict) else model(x)
        out = out.logits if hasattr(out, "logits") else out
        (out.float() ** 2).mean().backward()
    hf_g, fp_g = _grads(hf, peft), _grads(fp, fastpeft)
    assert set(fp_g) == set(hf_g)
    for k in hf_g:
        close(fp_g[k], hf_g[k], f"grad {k}")
    assert max(g.abs().max().item() for g in fp_g.values()) > 1e-6


@pytest.mark.parametrize("case", ["mlp", "mlp_gs", "conv2d", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = same_pair(case)
    x = inputs(case)
    expected = models.forward(hf, x)
    close(models.forward(fp, x), expected, "unmerged")
    models.assert_merge_roundtrip(fp, x, expected, close, safe_merge=safe)
    hf.merge_adapter()
    fp.merge_adapter(safe_merge=safe)
    hf_w = dict(hf.named_parameters())
    for n, p in fp.named_parameters():
        close(p, hf_w[n], f"merged {n}")
    hf.unmerge_adapter()
    fp.unmerge_adapter()
    merged = fp.merge_and_unload(safe_merge=safe)
    close(models.forward(merged, x), expected, "merge_and_unload")
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in merged.named_parameters():
        close(p, hf_w[n], f"merge_and_unload {n}")


def _two_adapters(lib):
    model = build(lib, "mlp")
    model.add_adapter("gs", config(lib, "mlp", apply_GS=True, init_weights=False, r=2, target_modules=["lin1"]))
    model = models.perturb(model, 5, 0.1, wanted=lambda name: ".gs." in name).eval()
    model.base_model.set_adapter(["default", "gs"])
    return model


def test_two_active_adapters_match_hf():
    hf, fp = _two_adapters(peft), _two_adapters(fastpeft)
    x = inputs("mlp")
    expected = models.forward(hf, x)
    close(models.forward(fp, x), expected, "two active adapters")
    models.assert_merge_roundtrip(fp, x, expected, close)
    with hf.disable_adapter(), fp.disable_adapter():
        close(models.forward(fp, x), models.forward(hf, x), "disabled")
    for name in ("gs", "default"):
        hf.base_model.set_adapter(name)
        fp.base_model.set_adapter(name)
        close(models.forward(fp, x), models.forward(hf, x), f"only {name}")
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in fp.merge_and_unload().named_parameters():
        close(p, hf_w[n], f"merged weight {n}")


@pytest.mark.parametrize("bias", ["all", "hra_only"])
def test_bias_option_trains_biases_like_hf(bias, tmp_path):
    fp = build(fastpeft, "mlp", bias=bias)
    hf = build(peft, "mlp", bias=bias)
    assert {n for n, p in fp.named_parameters() if p.requires_grad} == \
        {n for n, p in hf.named_parameters() if p.requires_grad}
    fp.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(base("mlp"), str(tmp_path)).eval()
    close(models.forward(loaded, inputs("mlp")), models.forward(fp, inputs("mlp")), f"bias={bias} in HF")
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(peft.get_peft_model_state_dict(hf))


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(r=4, bias="some"), "bias"),
    (dict(r=4, target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HRAConfig(**kwargs)


@pytest.mark.parametrize("target,match", [("gconv", "groups"), ("conv1", "square")])
def test_unsupported_conv_is_refused_and_model_untouched(target, match):
    model = base("conv2d")
    with pytest.raises(NotImplementedError, match=match):
        fastpeft.get_peft_model(model, HRAConfig(r=2, target_modules=["conv0", target]))
    assert not any(isinstance(m, fastpeft.methods.hra.HRALayer) for m in model.modules())


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(base("mlp"), HRAConfig(r=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast):
    """Adapter dtype (fp32 with autocast_adapter_dtype, else the base's), outputs and merge as HF PEFT."""
    out = []
    for lib in (peft, fastpeft):
        model = lib.get_peft_model(base("mlp").to(torch.bfloat16), config(lib, "mlp"),
                                   autocast_adapter_dtype=autocast)
        models.perturb(model, 0, 0.1)
        out.append((model, models.forward(model, inputs("mlp").to(torch.bfloat16))))
    (hf, hf_out), (fp, fp_out) = out
    assert {n: p.dtype for n, p in fp.named_parameters()} == {n: p.dtype for n, p in hf.named_parameters()}
    assert fp_out.dtype == hf_out.dtype == torch.bfloat16
    torch.testing.assert_close(fp_out, hf_out)
    hf.merge_adapter()
    fp.merge_adapter()
    torch.testing.assert_close(fp.base_model.model.lin1.base_layer.weight, hf.base_model.model.lin1.base_layer.weight,
                               atol=5e-4, rtol=1.6e-2)  # fp32 products rounded to bf16: at most an ulp apart
