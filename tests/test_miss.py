"""MiSS (balance / bat / mini) against HF PEFT: files both ways, outputs, gradients, merging, several adapters,
errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods.miss import MissConfig  # noqa: E402

ATOL = 1e-5

CASES = {
    "mlp": ("mlp", dict(r=4, target_modules=["lin0", "lin1"])),  # lin0: in_features 10 is not a multiple of 4
    "mlp_bat": ("mlp", dict(r=2, target_modules=["lin0", "lin1"], init_weights="bat")),
    "mlp_mini": ("mlp", dict(r=4, mini_r=5, target_modules=["lin0", "lin1"], init_weights="mini")),
    "mlp_random": ("mlp", dict(r=3, target_modules=["lin1", "head"], init_weights=False)),
    "mlp_dropout": ("mlp", dict(r=4, target_modules=["lin1"], miss_dropout=0.3)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4)),  # default targets: q_proj, v_proj
    "llama_bat": ("llama", dict(task_type="CAUSAL_LM", r=4, init_weights="bat",
                                target_modules=["q_proj", "v_proj", "down_proj"])),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=8)),  # default targets: q, v
    "t5_mini": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=8, mini_r=4, init_weights="mini")),
}


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    return (MissConfig if lib is fastpeft else lib.MissConfig)(**kw)


def base(case):
    return models.MODELS[CASES[case][0]][0]()


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    model = lib.get_peft_model(base(case), config(lib, case, **extra))
    return models.perturb(model, seed, 0.1).eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def same_pair(case, **extra):
    """HF model with perturbed blocks and a fastpeft model given the same blocks through HF's state dict."""
    hf = build(peft, case, **extra)
    fp = fastpeft.get_peft_model(base(case), config(fastpeft, case, **extra)).eval()
    result = fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf))
    assert not result.missing_keys and not result.unexpected_keys
    return hf, fp


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    hf = build(peft, case)
    expected = models.forward(hf, inputs(case))
    assert (expected - models.forward(base(case), inputs(case))).abs().max() > 1e-4
    hf.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(base(case), str(tmp_path)).eval()
    close(models.forward(fp, inputs(case)), expected, "fastpeft(HF adapter) vs HF")
    hf_file = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = fastpeft.get_peft_model_state_dict(fp)
    assert set(ours) == set(hf_file) and all(k.endswith("miss_block") for k in ours)
    for k in hf_file:
        assert torch.equal(ours[k], hf_file[k]), k


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("mlp_random", "t5_mini")])
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
        cfg["target_modules"] = sorted(cfg["target_modules"])
    assert fp_cfg == hf_cfg


@pytest.mark.parametrize("case", ["mlp", "mlp_bat", "mlp_mini", "mlp_random"])
def test_init_matches_hf(case):
    torch.manual_seed(3)
    hf = peft.get_peft_model(base(case), config(peft, case))
    torch.manual_seed(3)
    fp = fastpeft.get_peft_model(base(case), config(fastpeft, case))
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf), fastpeft.get_peft_model_state_dict(fp)
    assert set(hf_sd) == set(fp_sd)
    for k in hf_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k


def _grads(model, lib):
    return lib.get_peft_model_state_dict(
        model, state_dict={n: p.grad for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("case", ["mlp", "mlp_bat", "mlp_mini", "mlp_dropout", "llama_bat", "t5"])
def test_training_step_gradients_match_hf(case):
    hf, fp = same_pair(case)
    x = inputs(case)
    for model in (hf, fp):
        model.train()
        torch.manual_seed(1)  # the same dropout masks, drawn in the same order
        out = model(**x) if isinstance(x, dict) else model(x)
        out = out.logits if hasattr(out, "logits") else out
        (out.float() ** 2).mean().backward()
    hf_g, fp_g = _grads(hf, peft), _grads(fp, fastpeft)
    assert set(fp_g) == set(hf_g)
    for k in hf_g:
        close(fp_g[k], hf_g[k], f"grad {k}")
    assert max(g.abs().max().item() for g in fp_g.values()) > 1e-6


@pytest.mark.parametrize("case,safe", [("mlp", False), ("mlp", True), ("mlp_bat", False), ("mlp_bat", True),
                                       ("mlp_mini", True), ("llama", False), ("llama_bat", True)])
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
    hf_w = dict(hf.named_parameters())
    for n, p in fp.named_parameters():
        close(p, hf_w[n], f"unmerged {n}")
    merged = fp.merge_and_unload(safe_merge=safe)
    close(models.forward(merged, x), expected, "merge_and_unload")
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in merged.named_parameters():
        close(p, hf_w[n], f"merge_and_unload {n}")


def _two_adapters(lib, case, second: dict):
    model = build(lib, case)
    model.add_adapter("second", config(lib, case, **second))
    model = models.perturb(model, 5, 0.1, wanted=lambda name: ".second." in name).eval()
    model.base_model.set_adapter(["default", "second"])
    return model


@pytest.mark.parametrize("case,second", [("mlp", dict(r=3)), ("mlp_bat", dict(r=5, target_modules=["lin1"]))])
def test_two_active_adapters_match_hf(case, second):
    """Two balance adapters of different r (shards padded twice) / two bat adapters applied one after the other."""
    hf, fp = _two_adapters(peft, case, second), _two_adapters(fastpeft, case, second)
    x = inputs(case)
    expected = models.forward(hf, x)
    close(models.forward(fp, x), expected, "two active adapters")
    models.assert_merge_roundtrip(fp, x, expected, close)
    with hf.disable_adapter(), fp.disable_adapter():
        close(models.forward(fp, x), models.forward(hf, x), "disabled")
    for name in ("second", "default"):
        hf.base_model.set_adapter(name)
        fp.base_model.set_adapter(name)
        close(models.forward(fp, x), models.forward(hf, x), f"only {name}")
    hf.base_model.set_adapter(["default", "second"])
    fp.base_model.set_adapter(["default", "second"])
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in fp.merge_and_unload().named_parameters():
        close(p, hf_w[n], f"merged weight {n}")


def test_mixed_batch_rows_match_single_adapter_runs():
    fp = _two_adapters(fastpeft, "mlp", dict(r=2, init_weights="bat"))
    x = inputs("mlp")
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        mixed = fp(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with fp.disable_adapter():
                ref = models.forward(fp, x[i:i + 1])
        else:
            fp.base_model.set_adapter(name)
            ref = models.forward(fp, x[i:i + 1])
        close(mixed[i:i + 1], ref, f"row {i} ({name})")


@pytest.mark.parametrize("bias", ["all", "MiSS_only"])
def test_bias_option_trains_biases_like_hf(bias, tmp_path):
    fp = build(fastpeft, "mlp_bat", bias=bias)
    hf = build(peft, "mlp_bat", bias=bias)
    assert {n for n, p in fp.named_parameters() if p.requires_grad} == \
        {n for n, p in hf.named_parameters() if p.requires_grad}
    fp.save_pretrained(str(tmp_path))
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(peft.get_peft_model_state_dict(hf))
    loaded = peft.PeftModel.from_pretrained(base("mlp"), str(tmp_path)).eval()
    close(models.forward(loaded, inputs("mlp")), models.forward(fp, inputs("mlp")), f"bias={bias} in HF")


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(mini_r=0), "mini_r"),
    (dict(init_weights="fancy"), "init_weights"),
    (dict(miss_dropout=1.5), "miss_dropout"),
    (dict(bias="lots"), "bias"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MissConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=12, target_modules=["lin0"]), "exceeds in_features"),
    (dict(r=4, target_modules=["lin0"], init_weights="bat"), "divisible by r=4"),
    (dict(r=4, mini_r=3, target_modules=["lin1"], init_weights="mini"), "mini_r=3"),
])
def test_bad_shapes_are_refused_and_model_untouched(kwargs, match):
    model = base("mlp")
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(model, MissConfig(**kwargs))
    assert not any(isinstance(m, fastpeft.methods.miss.Linear) for m in model.modules())


@pytest.mark.parametrize("case", ["mlp", "mlp_bat"])
def test_bf16_base_matches_hf(case):
    """Adapter dtype (fp32 with autocast_adapter_dtype), outputs and merged weights as HF PEFT."""
    out = []
    for lib in (peft, fastpeft):
        model = lib.get_peft_model(base(case).to(torch.bfloat16), config(lib, case))
        models.perturb(model, 0, 0.1)
        out.append((model, models.forward(model, inputs(case).to(torch.bfloat16))))
    (hf, hf_out), (fp, fp_out) = out
    assert {n: p.dtype for n, p in fp.named_parameters()} == {n: p.dtype for n, p in hf.named_parameters()}
    assert fp_out.dtype == hf_out.dtype == torch.bfloat16
    torch.testing.assert_close(fp_out, hf_out)
    hf.merge_adapter()
    fp.merge_adapter()
    torch.testing.assert_close(fp.base_model.model.lin1.base_layer.weight, hf.base_model.model.lin1.base_layer.weight,
                               atol=5e-4, rtol=1.6e-2)  # fp32 products rounded to bf16: at most an ulp apart
