"""LoHa against HF PEFT 0.21.2: config and files both ways, outputs, gradients, dropout in training, merging,
several adapters, errors. HF PEFT is the oracle throughout (same base weights, same adapter weights)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods.loha import LoHaConfig  # noqa: E402

ATOL = 1e-5

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, alpha=8)),
    "mlp_random_init": ("mlp", dict(target_modules=["lin0", "lin1"], r=2, alpha=3, init_weights=False)),
    "conv1d": ("conv1d", dict(target_modules=["conv0", "conv1"], r=2, alpha=4)),
    "conv1d_effective": ("conv1d", dict(target_modules=["conv0", "conv1"], r=2, use_effective_conv2d=True)),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=3, alpha=6)),
    "conv2d_effective": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=2, alpha=4,
                                        use_effective_conv2d=True)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4, alpha=8)),  # default targets (q_proj, v_proj)
    "llama_patterns": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", r=4,
                                     rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16})),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=2, alpha=4, modules_to_save=["classifier"])),
}
# effective-conv LoHa: HF 0.21.2's hand-written backward of the CP product gets hada_w1_a / hada_w2_a wrong
# (it uses the other term's partial product); fastpeft uses autograd, checked against finite differences below
HF_GRAD_BUG = {"conv1d_effective", "conv2d_effective"}


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    return (LoHaConfig if lib is fastpeft else peft.LoHaConfig)(**kw)


def factory(case):
    return models.MODELS[CASES[case][0]][0]


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    model = lib.get_peft_model(factory(case)(), config(lib, case, **extra))
    return models.perturb(model, seed, 0.3).eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def differs(a, b):
    assert (a - b).abs().max().item() > 1e-3, "the adapter does not change the outputs"


def adapter_grads(model, lib):
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters() if p.requires_grad}
    return lib.get_peft_model_state_dict(model, state_dict=grads)


def step_grads(model, lib, x, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    out = model(**x) if isinstance(x, dict) else model(x)
    out = out if isinstance(out, torch.Tensor) else out.logits
    if out.requires_grad:  # False when module dropout skipped every adapter
        out.float().pow(2).mean().backward()
    return out.detach(), adapter_grads(model, lib)


# ------------------------------------------------------------------------------------------------ config
def test_config_fields_defaults_and_json_match_hf(tmp_path):
    assert set(LoHaConfig().to_dict()) == set(peft.LoHaConfig().to_dict())
    kw = dict(r=3, alpha=5, rank_dropout=0.2, module_dropout=0.1, use_effective_conv2d=True, init_weights=False,
              target_modules=["a", "b"], rank_pattern={"a": 2}, alpha_pattern={"b": 7}, modules_to_save=["head"])
    peft.LoHaConfig(**kw).save_pretrained(str(tmp_path / "hf"))
    LoHaConfig(**kw).save_pretrained(str(tmp_path / "fp"))
    hf_json, fp_json = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "fp"))
    for data in (hf_json, fp_json):
        data.pop("peft_version")
        data["target_modules"] = sorted(data["target_modules"])  # HF writes sets in hash order
    assert fp_json == hf_json
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(loaded, LoHaConfig) and loaded.rank_pattern == {"a": 2} and loaded.alpha == 5
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "fp")).use_effective_conv2d is True


# ------------------------------------------------------------------------------------------------ init and files
@pytest.mark.parametrize("case", list(CASES))
def test_init_and_saved_files_match_hf(case, tmp_path):
    """Same seed -> the same factors (HF's initialisation order), same file keys, shapes and values."""
    fp = fastpeft.get_peft_model(factory(case)(), config(fastpeft, case))
    hf = peft.get_peft_model(factory(case)(), config(peft, case))
    if config(fastpeft, case).init_weights:
        close(models.forward(fp.eval(), inputs(case)), models.forward(factory(case)(), inputs(case)), "identity")
    fp.save_pretrained(str(tmp_path / "fp"))
    hf.save_pretrained(str(tmp_path / "hf"))
    fp_sd, hf_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("fp", "hf"))
    assert set(fp_sd) == set(hf_sd) and any(".hada_w1_a" in k for k in fp_sd)
    for key in hf_sd:
        close(fp_sd[key], hf_sd[key], key)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft_and_back(case, tmp_path):
    hf = build(peft, case)
    hf_out = models.forward(hf, inputs(case))
    differs(hf_out, models.forward(factory(case)(), inputs(case)))
    hf.save_pretrained(str(tmp_path / "hf"))
    fp = fastpeft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "hf")).eval()
    close(models.forward(fp, inputs(case)), hf_out, "fastpeft(HF adapter) vs HF")
    fp.save_pretrained(str(tmp_path / "fp"))
    fp_sd, hf_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("fp", "hf"))
    assert set(fp_sd) == set(hf_sd)
    for key in hf_sd:
        close(fp_sd[key], hf_sd[key], key)
    back = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "fp")).eval()
    close(models.forward(back, inputs(case)), hf_out, "HF(fastpeft re-save) vs HF")


@pytest.mark.parametrize("case", ["mlp", "conv2d_effective", "llama_patterns", "bert"])
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    fp = build(fastpeft, case, seed=3)
    fp_out = models.forward(fp, inputs(case))
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    close(models.forward(hf, inputs(case)), fp_out, "HF(fastpeft adapter) vs fastpeft")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("case", ["mlp", "conv1d", "conv2d", "conv2d_effective", "llama"])
def test_gradients_match_hf(case):
    hf, fp = build(peft, case).train(), build(fastpeft, case).train()
    hf_out, hf_grads = step_grads(hf, peft, inputs(case), 0)
    fp_out, fp_grads = step_grads(fp, fastpeft, inputs(case), 0)
    close(fp_out, hf_out, "training output")
    assert set(fp_grads) == set(hf_grads)
    for key in hf_grads:
        if case in HF_GRAD_BUG and key.endswith(("hada_w1_a", "hada_w2_a")):
            continue
        close(fp_grads[key], hf_grads[key], f"grad {key}")


def test_effective_conv_gradients_are_exact():
    """The CP-form gradients (incl. those HF gets wrong) agree with finite differences of dW."""
    fp = build(fastpeft, "conv2d_effective").double()
    layer = fp.base_model.model.conv0
    factors = tuple(getattr(layer, n)["default"].detach().clone().requires_grad_(True) for n in CP_FACTORS)
    assert torch.autograd.gradcheck(lambda *t: _delta_from(layer, t), factors, fast_mode=True)


CP_FACTORS = ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")


def _delta_from(layer, tensors):
    """LoHa's effective-conv dW as a pure function of its six factors, built by the layer's own code."""
    originals = {n: getattr(layer, n)["default"] for n in CP_FACTORS}
    try:
        for n, t in zip(CP_FACTORS, tensors):
            getattr(layer, n)._parameters["default"] = t  # plain tensors: autograd flows from the inputs
        return layer.full_delta("default")
    finally:
        for n in CP_FACTORS:
            getattr(layer, n)._parameters["default"] = originals[n]


@pytest.mark.parametrize("case", ["mlp", "conv1d", "conv2d", "llama"])
def test_dropout_in_training_matches_hf_under_the_same_seed(case):
    """rank_dropout / module_dropout draw from the same RNG stream as HF PEFT: equal outputs and gradients."""
    extra = dict(rank_dropout=0.5, module_dropout=0.3)
    hf, fp = build(peft, case, **extra).train(), build(fastpeft, case, **extra).train()
    outs = []
    for seed in range(4):
        hf_out, hf_grads = step_grads(hf, peft, inputs(case), seed)
        fp_out, fp_grads = step_grads(fp, fastpeft, inputs(case), seed)
        close(fp_out, hf_out, f"training output, seed {seed}")
        for key in hf_grads:
            close(fp_grads[key], hf_grads[key], f"grad {key}, seed {seed}")
        outs.append(fp_out)
    assert any((outs[0] - o).abs().max() > 1e-4 for o in outs[1:]), "dropout did not change anything"


def test_dropout_is_never_merged():
    """Merging in training mode adds the deterministic dW: the merged eval output is the unmerged eval output."""
    extra = dict(rank_dropout=0.9, module_dropout=0.9)
    fp, hf = build(fastpeft, "conv2d", **extra), build(peft, "conv2d", **extra)
    expected = models.forward(fp, inputs("conv2d"))
    fp.train()
    hf.train()
    torch.manual_seed(0)
    fp.base_model.merge_adapter()
    hf.base_model.merge_adapter()
    fp.eval()
    close(models.forward(fp, inputs("conv2d")), expected, "merged in training mode")
    for name in ("conv0", "gconv", "conv1"):
        close(getattr(fp.base_model.model, name).base_layer.weight,
              getattr(hf.base_model.model, name).base_layer.weight, f"merged {name} vs HF")


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("case", ["mlp", "conv1d_effective", "conv2d", "conv2d_effective", "llama_patterns"])
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = build(peft, case), build(fastpeft, case)
    expected = models.forward(hf, inputs(case))
    models.assert_merge_roundtrip(fp, inputs(case), expected, close, safe_merge=True)
    merged_fp = fp.merge_and_unload()
    merged_hf = hf.merge_and_unload()
    close(models.forward(merged_fp, inputs(case)), expected, "merge_and_unload")
    hf_weights = dict(merged_hf.named_parameters())
    for name, param in merged_fp.named_parameters():
        close(param, hf_weights[name], f"merged {name}")


# ------------------------------------------------------------------------------------------------ adapters
def test_two_adapters_set_disable_delete_match_hf(tmp_path):
    case = "conv2d"
    fp, hf = build(fastpeft, case), build(peft, case)
    for lib, model in ((fastpeft, fp), (peft, hf)):
        torch.manual_seed(7)  # same initial factors in both libraries
        model.add_adapter("other", config(lib, case, r=2, alpha=2, use_effective_conv2d=True))
        models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    for name in ("default", "other"):
        fp.set_adapter(name)
        hf.set_adapter(name)
        close(models.forward(fp, inputs(case)), models.forward(hf, inputs(case)), f"adapter {name}")
    with fp.disable_adapter():
        close(models.forward(fp, inputs(case)), models.forward(factory(case)(), inputs(case)), "disabled")
    fp.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "other"), adapter_name="other")
    close(models.forward(reloaded.eval(), inputs(case)), models.forward(fp, inputs(case)), "HF loads 'other'")
    fp.delete_adapter("other")
    assert all("other" not in n for n, _ in fp.named_parameters())
    fp.set_adapter("default")
    hf.set_adapter("default")
    close(models.forward(fp, inputs(case)), models.forward(hf, inputs(case)), "after delete")


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0), "positive integer"),
    (dict(rank_pattern={"lin0": -1}), "rank_pattern"),
    (dict(rank_dropout=1.5), "rank_dropout"),
    (dict(alpha_pattern={"lin0": "big"}), "alpha_pattern"),
    (dict(module_dropout=-0.1), "module_dropout"),
    (dict(init_weights="lycoris"), "init_weights"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
])
def test_bad_config_is_refused_clearly(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LoHaConfig(target_modules=["lin0"], **kwargs)


def test_unsupported_module_and_missing_defaults_are_refused():
    with pytest.raises(ValueError, match="cannot wrap module 'emb'.*Linear, Conv1d, Conv2d.*target_modules"):
        fastpeft.get_peft_model(models.make_emb(), LoHaConfig(target_modules=["emb"]))
    with pytest.raises(ValueError, match="no default target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), LoHaConfig())
