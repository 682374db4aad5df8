"""LN tuning against HF PEFT: files both ways, outputs, gradients, merging (module swap), several adapters,
dtypes, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods.ln_tuning import LNTuningConfig, LNTuningLayer  # noqa: E402

ATOL = 1e-5

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin1"])),  # any module type can be copied, not only norms
    "llama": ("llama", dict(task_type="CAUSAL_LM")),  # default targets: input / post_attention norms, norm
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM")),  # ln_1, ln_2, ln_f
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM")),  # layer_norm, final_layer_norm
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    "llama_layer1": ("llama", dict(task_type="CAUSAL_LM", target_modules=".*layers\\.1\\..*layernorm")),
}


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    return (LNTuningConfig if lib is fastpeft else lib.LNTuningConfig)(**kw)


def base(case):
    return models.MODELS[CASES[case][0]][0]()


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    model = lib.get_peft_model(base(case), config(lib, case, **extra))
    return models.perturb(model, seed, 0.1).eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def same_pair(case):
    hf = build(peft, case)
    fp = fastpeft.get_peft_model(base(case), config(fastpeft, case)).eval()
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
    assert set(ours) == set(hf_file) and any(".ln_tuning_layers." in k for k in ours)
    for k in hf_file:
        assert torch.equal(ours[k], hf_file[k]), k


@pytest.mark.parametrize("case", list(CASES))
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
        if isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    assert fp_cfg == hf_cfg


def test_llama_file_keys_are_hf_keys(tmp_path):
    fp = fastpeft.get_peft_model(base("llama"), config(fastpeft, "llama"))
    keys = set(fastpeft.get_peft_model_state_dict(fp))
    assert "base_model.model.model.norm.ln_tuning_layers.weight" in keys
    assert "base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight" in keys
    assert keys == set(peft.get_peft_model_state_dict(peft.get_peft_model(base("llama"), config(peft, "llama"))))


def _grads(model, lib):
    return lib.get_peft_model_state_dict(
        model, state_dict={n: p.grad for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("case", ["mlp", "llama", "gpt2", "bert"])
def test_training_step_gradients_match_hf(case):
    hf, fp = same_pair(case)
    x = inputs(case)
    assert {n for n, p in fp.named_parameters() if p.requires_grad} == \
        {n for n, p in hf.named_parameters() if p.requires_grad}
    for model in (hf, fp):
        model.train()
        torch.manual_seed(1)  # the same dropout masks in both libraries
        out = model(**x) if isinstance(x, dict) else model(x)
        out = out.logits if hasattr(out, "logits") else out
        (out.float() ** 2).mean().backward()
    hf_g, fp_g = _grads(hf, peft), _grads(fp, fastpeft)
    assert set(fp_g) == set(hf_g)
    for k in hf_g:
        close(fp_g[k], hf_g[k], f"grad {k}")


@pytest.mark.parametrize("case", ["mlp", "llama", "t5"])
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = same_pair(case)
    x = inputs(case)
    expected = models.forward(hf, x)
    close(models.forward(fp, x), expected, "unmerged")
    models.assert_merge_roundtrip(fp, x, expected, close, safe_merge=True)
    hf.merge_adapter()
    fp.merge_adapter()
    close(models.forward(fp, x), models.forward(hf, x), "merged")
    hf_w = dict(hf.named_parameters())
    for n, p in fp.named_parameters():
        close(p, hf_w[n], f"merged {n}")
    with hf.disable_adapter(), fp.disable_adapter():  # disabling unmerges (as HF PEFT)
        close(models.forward(fp, x), models.forward(base(case), x), "disabled")
    merged = fp.merge_and_unload()
    close(models.forward(merged, x), expected, "merge_and_unload")
    hf_sd = hf.merge_and_unload().state_dict()
    assert set(merged.state_dict()) == set(hf_sd)
    for n, p in merged.state_dict().items():
        close(p, hf_sd[n], f"merge_and_unload {n}")


def _two_adapters(lib):
    model = build(lib, "llama")
    model.add_adapter("other", config(lib, "llama"))
    return models.perturb(model, 5, 0.1, wanted=lambda name: ".other." in name).eval()


def test_two_adapters_switch_merge_delete_like_hf():
    hf, fp = _two_adapters(peft), _two_adapters(fastpeft)
    x = inputs("llama")
    for name in ("other", "default"):
        hf.set_adapter(name)
        fp.set_adapter(name)
        close(models.forward(fp, x), models.forward(hf, x), f"adapter {name}")
    fp.base_model.merge_adapter(["other"])
    hf.base_model.merge_adapter(["other"])
    close(models.forward(fp, x), models.forward(hf, x), "other merged, default active")
    fp.base_model.merge_adapter(["default"])  # swaps 'other' out first: one merged adapter at a time
    hf.base_model.merge_adapter(["default"])
    close(models.forward(fp, x), models.forward(hf, x), "default merged")
    fp.base_model.unmerge_adapter()
    hf.base_model.unmerge_adapter()
    fp.delete_adapter("other")
    hf.delete_adapter("other")
    close(models.forward(fp, x), models.forward(hf, x), "after delete")
    assert not any(".other" in k for k in fp.state_dict())


def test_adapter_missing_on_a_layer_runs_the_base_there():
    """(HF PEFT raises a KeyError here; fastpeft runs the base module where the active adapter has no copy.)"""
    fp = build(fastpeft, "llama")
    fp.add_adapter("other", config(fastpeft, "llama", target_modules=["post_attention_layernorm"]))
    fp.set_adapter("other")
    with torch.no_grad():
        fp.base_model.model.model.layers[0].post_attention_layernorm.ln_tuning_layers["other"].weight.fill_(2.0)
    ref = build(fastpeft, "llama")
    with torch.no_grad():
        for layer in ref.base_model.model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.ln_tuning_layers["default"].load_state_dict(norm.base_layer.state_dict())
        ref.base_model.model.model.norm.ln_tuning_layers["default"].load_state_dict(
            ref.base_model.model.model.norm.base_layer.state_dict())
        ref.base_model.model.model.layers[0].post_attention_layernorm.ln_tuning_layers["default"].weight.fill_(2.0)
    close(models.forward(fp, inputs("llama")), models.forward(ref, inputs("llama")), "partial adapter")


def test_one_adapter_at_a_time():
    fp = _two_adapters(fastpeft)
    fp.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        models.forward(fp, inputs("llama"))
    with pytest.raises(ValueError, match="one adapter at a time"):
        fp.base_model.merge_adapter(["default", "other"])


def test_mixed_batch_rows_match_single_adapter_runs():
    fp = _two_adapters(fastpeft)
    x = inputs("llama")
    names = ["other", "default"]
    mixed = models.forward(fp, {**x, "adapter_names": names})
    for i, name in enumerate(names):
        fp.set_adapter(name)
        ref = models.forward(fp, {k: v[i:i + 1] for k, v in x.items()})
        close(mixed[i:i + 1], ref, f"row {i} ({name})")


def test_copies_keep_the_base_dtype_like_hf():
    """LN tuning copies modules: no fp32 autocast of the copies, as HF PEFT."""
    fp = fastpeft.get_peft_model(base("llama").to(torch.bfloat16), config(fastpeft, "llama"))
    hf = peft.get_peft_model(base("llama").to(torch.bfloat16), config(peft, "llama"))
    hf_dtypes = {n: p.dtype for n, p in hf.named_parameters()}
    assert {n: p.dtype for n, p in fp.named_parameters()} == hf_dtypes
    assert set(hf_dtypes.values()) == {torch.bfloat16}
    models.forward(fp, inputs("llama"))


def test_unknown_model_type_needs_target_modules():
    model = base("mlp")
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(model, LNTuningConfig())
    assert not any(isinstance(m, LNTuningLayer) for m in model.modules())


def test_bad_target_type_is_refused():
    with pytest.raises(ValueError, match="target_modules"):
        LNTuningConfig(target_modules=3)
