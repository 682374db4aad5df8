"""CorDA init (Yang et al. 2024): fastpeft's preprocess_corda + init_lora_weights='corda' against HF PEFT 0.21
on the same base weights and calibration data (factors, residual base weights, outputs), cache / covariance
files read across libraries, saved adapters loaded both ways, save-time conversion to plain LoRA, and errors.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as HFCordaConfig
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.inits.corda import CordaConfig, preprocess, preprocess_corda
from lora_init_helpers import CORDA_LIBS, build_corda, corda_calibration, corda_lora_config, corda_runner

import models
from conversion_helpers import (
    adapter_and_base_tensors,
    assert_bitwise_same,
    assert_converted_like_hf,
    assert_same_tensors,
)

_tensors, _assert_same = adapter_and_base_tensors, assert_same_tensors


def _inputs(model_name: str):
    return models.MODELS[model_name][1]()


def _residual(peft_model):
    """A plain model holding the rewritten base weights (what a CorDA user saves as the residual model)."""
    return copy.deepcopy(peft_model).unload()


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("model_name, method", [("mlp", "ipm"), ("mlp", "kpm"), ("llama", "ipm"),
                                                ("llama", "kpm"), ("conv1d_gpt2", "ipm")])
def test_factors_and_residual_match_hf_and_outputs_are_kept(model_name, method):
    fp, hf = build_corda("fastpeft", model_name, method), build_corda("hf", model_name, method)
    _assert_same(fp, hf)
    original = models.MODELS[model_name][0]()
    out = models.forward(fp, _inputs(model_name))
    torch.testing.assert_close(out, models.forward(hf, _inputs(model_name)), atol=1e-5, rtol=1e-5)
    # step 0: residual base + adapter reproduces the original model
    torch.testing.assert_close(out, models.forward(original, _inputs(model_name)), atol=1e-4, rtol=1e-4)
    for name, module in fp.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            base = dict(original.named_modules())[name.removeprefix("base_model.model.")].weight
            assert not torch.allclose(module.base_layer.weight, base), name  # the base was rewritten


@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_matches_hf(autocast):
    built = {}
    for name, (lib, _, pre) in CORDA_LIBS.items():
        model = models.make_mlp().bfloat16()
        config = corda_lora_config(name, "mlp", "ipm")
        pre(model, config, run_model=corda_runner(model, [x.bfloat16() for x in corda_calibration("mlp")]))
        built[name] = lib.get_peft_model(model, config, autocast_adapter_dtype=autocast)
    assert_bitwise_same(built["fastpeft"], built["hf"], autocast)


def test_ipm_keeps_the_largest_triplets_and_kpm_the_smallest():
    ipm = build_corda("fastpeft", "mlp", "ipm", lora_alpha=4)
    kpm = build_corda("fastpeft", "mlp", "kpm", lora_alpha=4)
    layers = {m: dict(model.named_modules())["base_model.model.lin1"]
              for m, model in (("ipm", ipm), ("kpm", kpm))}
    deltas = {m: (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
              for m, layer in layers.items()}
    assert torch.linalg.matrix_rank(deltas["ipm"]) == 4
    assert deltas["ipm"].norm() > 3 * deltas["kpm"].norm()


def test_rank_pattern_and_hooked_model_match_hf():
    kw = {"rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 16}}
    built = {}
    for name, (lib, _, pre) in CORDA_LIBS.items():
        model, hooked = models.make_mlp(), models.make_mlp()
        config = corda_lora_config(name, "mlp", "kpm", **kw)
        pre(model, config, run_model=corda_runner(hooked, corda_calibration("mlp")), hooked_model=hooked)
        built[name] = lib.get_peft_model(model, config)
    _assert_same(built["fastpeft"], built["hf"])
    assert built["fastpeft"].base_model.model.lin1.lora_A["default"].weight.shape == (2, 10 * 2)
    assert preprocess is preprocess_corda


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("writer, reader", [("hf", "fastpeft"), ("fastpeft", "hf")])
def test_cache_and_covariance_files_are_read_across_libraries(writer, reader, tmp_path):
    files = {"cache_file": str(tmp_path / "c" / "cache.pt"), "covariance_file": str(tmp_path / "cov.pt")}
    written = build_corda(writer, "mlp", "kpm", **files)
    assert (tmp_path / "c" / "cache.pt").exists() and (tmp_path / "cov.pt").exists()
    from_cache = build_corda(reader, "mlp", "kpm", run=False, **files)  # no run_model: the cache is used
    _assert_same(from_cache, written)
    (tmp_path / "c" / "cache.pt").unlink()  # the covariance file alone is enough to decompose again
    from_cov = build_corda(reader, "mlp", "kpm", run=False, **files)
    _assert_same(from_cov, written)


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
@pytest.mark.parametrize("writer, reader", [("hf", "fastpeft"), ("fastpeft", "hf")])
def test_saved_adapter_loads_in_the_other_library(model_name, writer, reader, tmp_path):
    built = {name: build_corda(name, model_name) for name in CORDA_LIBS}
    source = built[writer]
    # HF PEFT's workflow: the saved adapter is plain LoRA
    source.peft_config["default"].init_lora_weights = True
    source.save_pretrained(str(tmp_path / "a"))
    other = built[reader]
    other.peft_config["default"].init_lora_weights = True
    other.save_pretrained(str(tmp_path / "b"))
    saved_a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    saved_b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert sorted(saved_a) == sorted(saved_b)
    for key in saved_a:
        torch.testing.assert_close(saved_a[key], saved_b[key], atol=1e-5, rtol=1e-5, msg=key)
    lib = CORDA_LIBS[reader][0]
    loaded = lib.PeftModel.from_pretrained(_residual(source), str(tmp_path / "a"))
    inputs = _inputs(model_name)
    torch.testing.assert_close(models.forward(loaded, inputs), models.forward(source, inputs),
                               atol=1e-5, rtol=1e-5)


def test_config_file_round_trips_corda_config(tmp_path):
    config = corda_lora_config("fastpeft", "mlp", "kpm", cache_file="x.pt")
    config.save_pretrained(str(tmp_path / "fp"))
    hf_config = peft.LoraConfig.from_pretrained(str(tmp_path / "fp"))
    assert isinstance(hf_config.corda_config, HFCordaConfig)
    assert dataclasses.asdict(hf_config.corda_config) == dataclasses.asdict(config.corda_config)
    hf_config.save_pretrained(str(tmp_path / "hf"))
    back = fastpeft.LoraConfig.from_pretrained(str(tmp_path / "hf"))
    assert back.corda_config == config.corda_config and isinstance(back.corda_config, CordaConfig)


def test_loading_an_unrelabelled_corda_adapter_needs_preprocessing_in_both(tmp_path):
    model = build_corda("fastpeft", "mlp")
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="preprocess_corda"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
    with pytest.raises(ValueError, match="preprocess_corda"):
        peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


def _train_step(model, model_name: str) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = _inputs(model_name)
    model.train()
    out = (model(**inputs, labels=inputs["input_ids"]).loss if model_name == "llama"
           else model(inputs).pow(2).mean())
    out.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
def test_conversion_to_plain_lora_matches_hf(model_name, tmp_path):
    fp, hf = build_corda("fastpeft", model_name), build_corda("hf", model_name)
    fp.save_pretrained(str(tmp_path / "init"))
    shutil.copytree(tmp_path / "init", tmp_path / "init_hf")
    _train_step(fp, model_name)
    assert_converted_like_hf(fp, hf, tmp_path, models.MODELS[model_name][0], _inputs(model_name), (8, 16))


# ---------------------------------------------------------------------------------------------- errors
def test_get_peft_model_without_preprocessing_is_refused():
    with pytest.raises(ValueError, match=r"preprocess_corda\(model, lora_config, run_model=\.\.\.\)"):
        fastpeft.get_peft_model(models.make_mlp(), corda_lora_config("fastpeft", "mlp"))


def test_preprocessing_with_another_rank_is_refused():
    model = models.make_mlp()
    pre_config = corda_lora_config("fastpeft", "mlp", r=2)
    preprocess_corda(model, pre_config, run_model=corda_runner(model, corda_calibration("mlp")))
    with pytest.raises(ValueError,
                       match=r"U_WC has shape \(20, 2\), expected \(20, 4\).*same model and LoraConfig"):
        fastpeft.get_peft_model(model, corda_lora_config("fastpeft", "mlp", r=4))


def test_bad_config_and_preprocessing_input_are_refused(tmp_path):
    with pytest.raises(ValueError, match="corda_method must be 'ipm' or 'kpm'"):
        CordaConfig(corda_method="svd")
    with pytest.raises(TypeError, match="corda_config must be a CordaConfig"):
        fastpeft.LoraConfig(init_lora_weights="corda", corda_config=3)
    assert fastpeft.LoraConfig(init_lora_weights="corda").corda_config == CordaConfig()
    coerced = fastpeft.LoraConfig(init_lora_weights="corda",
                                  corda_config={"corda_method": "kpm", "verbose": True})
    assert coerced.corda_config == CordaConfig(corda_method="kpm", verbose=True)
    model = models.make_mlp()
    with pytest.raises(ValueError, match="needs run_model"):
        preprocess_corda(model, corda_lora_config("fastpeft", "mlp"))
    with pytest.raises(ValueError, match="corda_config"):
        preprocess_corda(model, fastpeft.LoraConfig(target_modules=["lin0"]), run_model=lambda: None)
    with pytest.raises(ValueError, match="'lin1' never ran during run_model"):
        preprocess_corda(model, corda_lora_config("fastpeft", "mlp"),
                         run_model=lambda: model.lin0(torch.randn(4, 10)))
    with pytest.raises(ValueError,
                       match=r"r=4 for layer 'head' exceeds min\(in_features, out_features\) = 2"):
        preprocess_corda(model, corda_lora_config("fastpeft", "mlp", target_modules=["head"]),
                         run_model=corda_runner(model, corda_calibration("mlp")))
    with pytest.raises(ValueError, match="NaN or inf"):
        preprocess_corda(model, corda_lora_config("fastpeft", "mlp"),
                         run_model=lambda: model(torch.full((2, 10), float("nan"))))
    assert not any(hasattr(m, "_fastpeft_corda_eigens") for m in model.modules())  # nothing half-done left


def test_non_linear_targets_are_refused():
    model = models.make_emb()
    config = fastpeft.LoraConfig(target_modules=["emb"], r=2, init_lora_weights="corda")
    preprocess_corda(model, config, run_model=lambda: model(models.emb_inputs()))  # nothing linear targeted
    with pytest.raises(ValueError, match="linear layers"):
        fastpeft.get_peft_model(model, config)
