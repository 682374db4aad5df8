"""LoRA init schemes (orthogonal, PiSSA, pissa_niter_K, OLoRA) and PiSSA/OLoRA -> LoRA conversion on save.

Checked against HF PEFT 0.21 with the same seed: the random draws line up (factories build the layers in the
same order), so adapter factors and residual base weights are compared value for value.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.checkpoint.keys import get_peft_model_state_dict

import models

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "k_proj", "down_proj"],
           "conv1d_gpt2": ["c_fc", "c_proj"]}
SCHEMES = ["pissa", "pissa_niter_2", "olora", "orthogonal"]
MODIFIES_BASE = {"pissa", "pissa_niter_2", "olora"}


def _config(lib, model: str, scheme, **kw):
    kw = {"target_modules": TARGETS[model], "r": 4, "lora_alpha": 8, "init_lora_weights": scheme, **kw}
    if model == "llama":
        kw["task_type"] = "CAUSAL_LM"
    return lib.LoraConfig(**kw)


def _pair(model: str, scheme, seed: int = 7, **kw):
    factory, _ = models.MODELS[model]
    torch.manual_seed(seed)
    fp = fastpeft.get_peft_model(factory(), _config(fastpeft, model, scheme, **kw))
    torch.manual_seed(seed)
    hf = peft.get_peft_model(factory(), _config(peft, model, scheme, **kw))
    return fp, hf


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


def _factors(model):
    """{layer name: (A, B)} of adapter 'default' (works for fastpeft and HF PEFT models alike)."""
    return {n: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# ---------------------------------------------------------------------------------------------- init schemes
# HF PEFT 0.21's OLoRA ignores fan_in_fan_out (broken factors on Conv1D): that pair is tested below on its own
SCHEME_CASES = [(m, s) for m in ("mlp", "llama", "conv1d_gpt2") for s in SCHEMES
                if (m, s) != ("conv1d_gpt2", "olora")]


@pytest.mark.parametrize(("model", "scheme"), SCHEME_CASES)
def test_scheme_matches_hf_and_keeps_outputs(model, scheme):
    factory, inputs = models.MODELS[model]
    original = factory()
    fp, hf = _pair(model, scheme)
    torch.testing.assert_close(models.forward(fp, inputs()), models.forward(original, inputs()),
                               atol=1e-5, rtol=0)

    fp_sd, hf_sd = get_peft_model_state_dict(fp), peft.get_peft_model_state_dict(hf)
    assert sorted(fp_sd) == sorted(hf_sd)
    for key in hf_sd:  # same torch ops in the same order: SVD / QR signs and random draws agree
        torch.testing.assert_close(fp_sd[key], hf_sd[key], atol=1e-6, rtol=1e-5, msg=key)
    fp_base, hf_base, orig = _base_weights(fp), _base_weights(hf), dict(original.named_parameters())
    assert sorted(fp_base) == sorted(hf_base)
    for key in hf_base:
        torch.testing.assert_close(fp_base[key], hf_base[key], atol=1e-6, rtol=1e-5, msg=key)
        unchanged = torch.equal(fp_base[key],
                                orig[key.replace("base_model.model.", "").replace(".base_layer", "")])
        assert unchanged != (scheme in MODIFIES_BASE), key
    for name, (a, b) in _factors(fp).items():
        assert a.abs().sum() > 0 and b.abs().sum() > 0, name  # no zero factor, unlike init_lora_weights=True
        product = b @ a
        if scheme == "orthogonal":  # A from Q's even rows, B from its odd rows: B @ A = 0
            assert product.abs().max() < 1e-6, name
        else:
            h_a, h_b = _factors(hf)[name]
            torch.testing.assert_close(product, h_b @ h_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_half_precision_base_matches_hf(scheme, autocast):
    # HF PEFT stores the factors in the base dtype first, then autocast widens them to float32
    config = {"target_modules": ["lin0", "lin1"], "r": 4, "init_lora_weights": scheme}
    torch.manual_seed(5)
    fp = fastpeft.get_peft_model(models.make_mlp().bfloat16(), fastpeft.LoraConfig(**config),
                                 autocast_adapter_dtype=autocast)
    torch.manual_seed(5)
    hf = peft.get_peft_model(models.make_mlp().bfloat16(), peft.LoraConfig(**config),
                             autocast_adapter_dtype=autocast)
    fp_sd, hf_sd = get_peft_model_state_dict(fp), peft.get_peft_model_state_dict(hf)
    for key in hf_sd:
        assert fp_sd[key].dtype == hf_sd[key].dtype == (torch.float32 if autocast else torch.bfloat16)
        assert torch.equal(fp_sd[key], hf_sd[key]), key
    fp_base, hf_base = _base_weights(fp), _base_weights(hf)
    assert all(torch.equal(fp_base[k], hf_base[k]) and fp_base[k].dtype == torch.bfloat16 for k in hf_base)


def test_olora_on_conv1d_keeps_outputs():
    factory, inputs = models.MODELS["conv1d_gpt2"]
    fp = fastpeft.get_peft_model(factory(), _config(fastpeft, "conv1d_gpt2", "olora"))
    torch.testing.assert_close(models.forward(fp, inputs()), models.forward(factory(), inputs()),
                               atol=1e-5, rtol=0)
    layer = fp.base_model.model.c_fc
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 10) and b.shape == (24, 4)
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)  # Q's columns are orthonormal


def test_pissa_factors_are_the_top_singular_triplets():
    fp = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", "pissa", lora_alpha=2, r=3))
    layer, weight = fp.base_model.model.lin1, models.make_mlp().lin1.weight.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    singular = torch.linalg.svdvals(weight)[:3]
    scaling = 2 / 3
    torch.testing.assert_close(torch.linalg.svdvals(scaling * b @ a)[:3], singular, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight + scaling * b @ a, weight, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("scheme", ["pissa", "olora", "orthogonal"])
@pytest.mark.parametrize("model,targets", [("emb", ["emb"]), ("conv1d", ["conv0"]), ("mha", ["mha"])])
def test_non_linear_layers_are_refused_untouched(model, targets, scheme):
    factory, _ = models.MODELS[model]
    base, before = factory(), factory().state_dict()
    with pytest.raises(ValueError, match="linear layers"):
        fastpeft.get_peft_model(base,
                                fastpeft.LoraConfig(target_modules=targets, r=2, init_lora_weights=scheme))
    after = base.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_rank_above_layer_size_and_odd_orthogonal_rank_are_refused():
    with pytest.raises(ValueError, match=r"r <= min\(in_features, out_features\) = 2"):
        fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=["head"], r=4,
                                                                       init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="even rank"):
        fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=["lin0"], r=3,
                                                                       init_lora_weights="orthogonal"))


@pytest.mark.parametrize("value", ["svd", "pissa_niter_0", "pissa_niter_x", "olora_niter_2", 3])
def test_unknown_scheme_lists_valid_ones(value):
    with pytest.raises(ValueError) as err:
        fastpeft.LoraConfig(init_lora_weights=value)
    msg = str(err.value)
    for name in ("True", "False", "'gaussian'", "'orthogonal'", "'pissa'", "'olora'", "pissa_niter_K"):
        assert name in msg, name


def test_config_accepts_the_niter_family_and_refuses_lora_bias():
    assert fastpeft.LoraConfig(init_lora_weights="pissa_niter_16").init_lora_weights == "pissa_niter_16"
    with pytest.raises(ValueError, match="lora_bias=True needs init_lora_weights"):
        fastpeft.LoraConfig(init_lora_weights="olora", lora_bias=True)


@pytest.mark.parametrize("options,rewrites", [
    ({}, False), ({"init_lora_weights": "gaussian"}, False), ({"init_lora_weights": "eva"}, False),
    ({"init_lora_weights": "pissa"}, True), ({"init_lora_weights": "pissa_niter_4"}, True),
    ({"init_lora_weights": "olora"}, True), ({"init_lora_weights": "corda"}, True),
    ({"init_lora_weights": "lora_ga"}, True),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, True),
    ({"kasa_config": {}}, True), ({"layer_replication": [[0, 1]]}, True),
])
def test_rewrites_base_weights(options, rewrites):
    """What loading backs up and the fingerprint skips: injections that change the base model itself."""
    assert fastpeft.LoraConfig(target_modules=["lin0"], **options).rewrites_base_weights is rewrites
    assert fastpeft.IA3Config(target_modules=["lin0"], feedforward_modules=[]).rewrites_base_weights is False


# ---------------------------------------------------------------------------------------------- conversion
def _train_step(model, name: str, inputs):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    if name == "llama":
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    else:
        loss = model(inputs).pow(2).mean()
    loss.backward()
    opt.step()
    model.eval()


def _config_json(path) -> dict:
    data = json.loads((path / "adapter_config.json").read_text())
    data.pop("peft_version")
    return {k: sorted(map(str, v)) if isinstance(v, list) else v for k, v in data.items()}


# DoRA: base + converted delta equals residual + trained delta, so the trained magnitude stays valid unchanged
@pytest.mark.parametrize("model,scheme,relabel,kw", [
    ("mlp", "pissa", False, {}), ("llama", "olora", False, {}), ("llama", "pissa_niter_3", True, {}),
    ("mlp", "pissa", False, {"use_dora": True}), ("llama", "olora", False, {"use_dora": True})])
def test_conversion_applies_to_the_original_model_and_matches_hf(model, scheme, relabel, kw, tmp_path):
    factory, inputs = models.MODELS[model]
    fp, hf = _pair(model, scheme, seed=3, **kw)
    if relabel:  # HF PEFT's documented workflow: mark the initial adapter init_lora_weights=True
        fp.peft_config["default"].init_lora_weights = True
    fp.save_pretrained(tmp_path / "init")
    shutil.copytree(tmp_path / "init", tmp_path / "init_hf")
    _train_step(fp, model, inputs())
    trained = models.forward(fp, inputs())
    assert not torch.allclose(trained, models.forward(factory(), inputs()), atol=1e-4)
    fp.save_pretrained(tmp_path / "trained")
    fp.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    for lib in (fastpeft, peft):  # the converted adapter is plain LoRA on the ORIGINAL base model
        loaded = lib.PeftModel.from_pretrained(factory(), str(tmp_path / "conv"))
        torch.testing.assert_close(models.forward(loaded, inputs()), trained, atol=1e-4, rtol=1e-4)

    # HF PEFT's conversion of the same trained adapter
    peft.set_peft_model_state_dict(hf, load_file(str(tmp_path / "trained" / "adapter_model.safetensors")))
    hf.save_pretrained(str(tmp_path / "conv_hf"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init_hf"))
    fp_sd = load_file(str(tmp_path / "conv" / "adapter_model.safetensors"))
    hf_sd = load_file(str(tmp_path / "conv_hf" / "adapter_model.safetensors"))
    # HF PEFT 0.21 drops DoRA's trained magnitude from its converted file (a reload re-initialises it: wrong
    # outputs); fastpeft keeps it, and the other tensors are the same
    magnitudes = {k for k in fp_sd if "lora_magnitude_vector" in k}
    assert bool(magnitudes) == bool(kw.get("use_dora"))
    assert sorted(set(fp_sd) - magnitudes) == sorted(hf_sd)
    for key in hf_sd:
        torch.testing.assert_close(fp_sd[key], hf_sd[key], atol=1e-6, rtol=1e-5, msg=key)
    fp_cfg, hf_cfg = _config_json(tmp_path / "conv"), _config_json(tmp_path / "conv_hf")
    assert fp_cfg == hf_cfg
    assert (fp_cfg["r"], fp_cfg["lora_alpha"], fp_cfg["init_lora_weights"]) == (8, 16, True)
    assert _config_json(tmp_path / "init") == _config_json(tmp_path / "init_hf")  # both rewritten as HF does


def test_conversion_doubles_patterns_as_hf(tmp_path):
    kw = {"rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 4}}
    fp, hf = _pair("mlp", "olora", **kw)
    fp.save_pretrained(tmp_path / "init")
    shutil.copytree(tmp_path / "init", tmp_path / "init_hf")
    fp.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    hf.save_pretrained(str(tmp_path / "conv_hf"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init_hf"))
    cfg = _config_json(tmp_path / "conv")
    assert cfg == _config_json(tmp_path / "conv_hf")
    assert cfg["rank_pattern"] == {"lin1": 4} and cfg["alpha_pattern"] == {"lin0": 8}


def test_conversion_of_a_plain_lora_adapter_is_refused(tmp_path):
    model = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", "gaussian"))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="converts PiSSA / OLoRA adapters.*'gaussian'"):
        model.save_pretrained(tmp_path / "out",
                              path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_conversion_refuses_a_mismatching_initial_adapter_and_rslora_patterns(tmp_path):
    fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", "pissa", r=2)).save_pretrained(
        tmp_path / "init")
    model = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", "pissa"))
    with pytest.raises(ValueError, match="does not match adapter 'default'"):
        model.save_pretrained(tmp_path / "out",
                              path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", "pissa", use_rslora=True,
                                                               rank_pattern={"lin1": 2}))
    with pytest.raises(ValueError, match="use_rslora"):
        model.save_pretrained(tmp_path / "out",
                              path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_conversion_is_refused_for_prompt_methods(tmp_path):
    config = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = fastpeft.get_peft_model(models.make_llama(), config)
    with pytest.raises(NotImplementedError, match="path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path / "out",
                              path_initial_model_for_weight_conversion=str(tmp_path / "init"))
