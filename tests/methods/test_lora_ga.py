"""LoRA-GA init (Wang et al. 2024): fastpeft's preprocess_loraga + init_lora_weights='lora_ga' against HF PEFT
0.21 on the same base weights and batches (factors, residual base weights, outputs) for every direction and
scale, gradient cache files read across libraries, saved adapters loaded both ways, save-time conversion to
plain LoRA, and errors.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.inits.lora_ga import LoraGAConfig, preprocess_loraga
from lora_init_helpers import LORAGA_LIBS, build_loraga, loraga_batches, loraga_lora_config, loraga_trainer

import models
from conversion_helpers import (
    adapter_and_base_tensors,
    assert_bitwise_same,
    assert_converted_like_hf,
    assert_same_tensors,
)

DIRECTIONS = ["ArBr", "A2rBr", "ArB2r", "random"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]


_tensors, _assert_same = adapter_and_base_tensors, assert_same_tensors


def _inputs(model_name: str):
    return models.MODELS[model_name][1]()


# ---------------------------------------------------------------------------------------------- init
# each direction and each scale at least once (plus the defaults below)
@pytest.mark.parametrize("direction, scale",
                         [*zip(DIRECTIONS, SCALES), ("ArBr", "unit"), ("random", "weight_svd")])
def test_every_direction_and_scale_matches_hf_on_the_mlp(direction, scale):
    ga = {"direction": direction, "scale": scale, "stable_gamma": 4}
    fp, hf = build_loraga("fastpeft", "mlp", ga), build_loraga("hf", "mlp", ga)
    _assert_same(fp, hf)
    inputs = _inputs("mlp")
    torch.testing.assert_close(models.forward(fp, inputs), models.forward(models.make_mlp(), inputs),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name, ga",
                         [("llama", {}), ("llama", {"direction": "ArBr", "scale": "weight_svd"}),
                          ("conv1d_gpt2", {}), ("conv1d_gpt2", {"scale": "gd_scale"})])
def test_transformers_models_match_hf_and_outputs_are_kept(model_name, ga):
    fp, hf = build_loraga("fastpeft", model_name, ga), build_loraga("hf", model_name, ga)
    _assert_same(fp, hf)
    inputs, original = _inputs(model_name), models.MODELS[model_name][0]()
    out = models.forward(fp, inputs)
    torch.testing.assert_close(out, models.forward(hf, inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, models.forward(original, inputs), atol=1e-4, rtol=1e-4)  # step 0
    for name, module in fp.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            assert (module.lora_A["default"].weight.abs().sum() > 0
                    and module.lora_B["default"].weight.abs().sum() > 0)
            base = dict(original.named_modules())[name.removeprefix("base_model.model.")].weight
            assert not torch.equal(module.base_layer.weight, base), name


@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_matches_hf(autocast):
    built = {}
    for name, (lib, _, pre) in LORAGA_LIBS.items():
        model = models.make_mlp().bfloat16()
        config = loraga_lora_config(name, "mlp")
        batch = loraga_batches("mlp")[0].bfloat16()
        pre(model, config, train_step=lambda m=model, x=batch: m(x).float().pow(2).mean().backward())
        torch.manual_seed(3)
        built[name] = lib.get_peft_model(model, config, autocast_adapter_dtype=autocast)
    assert_bitwise_same(built["fastpeft"], built["hf"], autocast)


def test_factors_follow_the_gradient_and_state_is_restored():
    model = models.make_mlp()
    model.lin1.weight.grad = torch.ones_like(model.lin1.weight)  # stale gradient: not part of the estimate
    model.head.weight.requires_grad_(False)
    config = loraga_lora_config("fastpeft", "mlp", {"direction": "ArB2r", "scale": "unit"})
    preprocess_loraga(model, config, train_step=loraga_trainer(model, "mlp"))
    assert not model.training and model.lin1.weight.grad is None
    assert model.lin0.weight.requires_grad and not model.head.weight.requires_grad
    grad = model.lin1._fastpeft_loraga.grad

    reference = models.make_mlp()  # the mean gradient over the 3 batches, computed directly
    loraga_trainer(reference, "mlp")()
    torch.testing.assert_close(grad, reference.lin1.weight.grad / 3)

    layer = fastpeft.get_peft_model(model, config).base_model.model.lin1
    u, s, vh = torch.linalg.svd(grad)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    # ArB2r: A spans the top-3 right singular vectors, B the next 3 left ones (times their singular values)
    torch.testing.assert_close((a @ vh[:3].T).abs(), torch.eye(3), atol=1e-3, rtol=0)
    torch.testing.assert_close((u[:, 3:6].T @ b).abs(), torch.diag(s[3:6]), atol=1e-3, rtol=1e-3)


def test_get_peft_model_config_decides_direction_and_scale_as_hf():
    built = {}
    for name, (lib, _, pre) in LORAGA_LIBS.items():
        model = models.make_mlp()
        pre(model, loraga_lora_config(name, "mlp"), train_step=loraga_trainer(model, "mlp"))
        torch.manual_seed(3)
        unit_config = loraga_lora_config(name, "mlp", {"direction": "A2rBr", "scale": "unit"})
        built[name] = lib.get_peft_model(model, unit_config)
    _assert_same(built["fastpeft"], built["hf"])
    unit = build_loraga("fastpeft", "mlp", {"direction": "A2rBr", "scale": "unit"})
    _assert_same(built["fastpeft"], unit)


def test_default_targets_are_filled_in_as_hf():
    built = {}
    for name, (lib, ga_cls, pre) in LORAGA_LIBS.items():
        model = models.make_llama()
        config = lib.LoraConfig(r=2, init_lora_weights="lora_ga", lora_ga_config=ga_cls())
        pre(model, config, train_step=loraga_trainer(model, "llama"))
        assert set(config.target_modules) == {"q_proj", "v_proj"}
        torch.manual_seed(3)
        built[name] = lib.get_peft_model(model, config)
    _assert_same(built["fastpeft"], built["hf"])


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("writer, reader", [("hf", "fastpeft"), ("fastpeft", "hf")])
def test_gradient_cache_is_read_across_libraries(writer, reader, tmp_path):
    cache = str(tmp_path / "sub" / "grads.pt")
    written = build_loraga(writer, "mlp", cache_file=cache)
    read = build_loraga(reader, "mlp", cache_file=cache, train=False)  # no train_step: the cache is used
    _assert_same(read, written)


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
@pytest.mark.parametrize("writer, reader", [("hf", "fastpeft"), ("fastpeft", "hf")])
def test_saved_adapter_loads_in_the_other_library(model_name, writer, reader, tmp_path):
    source = build_loraga(writer, model_name)
    source.save_pretrained(str(tmp_path / "a"))
    build_loraga(reader, model_name).save_pretrained(str(tmp_path / "b"))
    saved_a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    saved_b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert sorted(saved_a) == sorted(saved_b)
    for key in saved_a:
        torch.testing.assert_close(saved_a[key], saved_b[key], atol=1e-5, rtol=1e-5, msg=key)
    # loading needs no preprocessing: the layers start as plain LoRA and take the saved factors
    residual = copy.deepcopy(source).unload()
    loaded = LORAGA_LIBS[reader][0].PeftModel.from_pretrained(residual, str(tmp_path / "a"))
    inputs = _inputs(model_name)
    torch.testing.assert_close(models.forward(loaded, inputs), models.forward(source, inputs),
                               atol=1e-5, rtol=1e-5)


def test_config_file_round_trips_lora_ga_config(tmp_path):
    config = loraga_lora_config("fastpeft", "mlp",
                                {"direction": "random", "scale": "gd_scale", "stable_gamma": 8})
    config.save_pretrained(str(tmp_path / "fp"))
    hf_config = peft.LoraConfig.from_pretrained(str(tmp_path / "fp"))
    assert dataclasses.asdict(hf_config.lora_ga_config) == dataclasses.asdict(config.lora_ga_config)
    hf_config.save_pretrained(str(tmp_path / "hf"))
    back = fastpeft.LoraConfig.from_pretrained(str(tmp_path / "hf"))
    assert back.lora_ga_config == config.lora_ga_config and isinstance(back.lora_ga_config, LoraGAConfig)


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
def test_conversion_to_plain_lora_matches_hf(model_name, tmp_path):
    fp, hf = build_loraga("fastpeft", model_name), build_loraga("hf", model_name)
    fp.save_pretrained(str(tmp_path / "init"))
    shutil.copytree(tmp_path / "init", tmp_path / "init_hf")
    opt = torch.optim.SGD([p for p in fp.parameters() if p.requires_grad], lr=0.5)
    fp.train()
    loraga_trainer(fp, model_name)()
    opt.step()
    fp.eval()
    assert_converted_like_hf(fp, hf, tmp_path, models.MODELS[model_name][0], _inputs(model_name), (6, 16))


# ---------------------------------------------------------------------------------------------- errors
def test_missing_preprocessing_warns_and_falls_back_to_plain_lora(caplog):
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        model = fastpeft.get_peft_model(models.make_mlp(), loraga_lora_config("fastpeft", "mlp"))
    assert "run preprocess_loraga(model, lora_config, train_step=...) before get_peft_model" in caplog.text
    assert not model.base_model.model.lin0.lora_B["default"].weight.any()
    torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight, models.make_mlp().lin0.weight)


def test_bad_config_and_preprocessing_input_are_refused():
    with pytest.raises(ValueError, match="direction must be one of"):
        LoraGAConfig(direction="AB")
    with pytest.raises(ValueError, match="scale must be one of"):
        LoraGAConfig(scale="big")
    with pytest.raises(TypeError, match="lora_ga_config must be a LoraGAConfig"):
        fastpeft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config="ArB2r")
    coerced = fastpeft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"direction": "ArBr"})
    assert coerced.lora_ga_config == LoraGAConfig(direction="ArBr")
    model = models.make_mlp()
    with pytest.raises(ValueError, match="lora_ga_config is not set"):
        preprocess_loraga(model, fastpeft.LoraConfig(target_modules=["lin0"], init_lora_weights="lora_ga"),
                          train_step=lambda: None)
    with pytest.raises(ValueError, match="no gradient reached layer 'lin1'"):
        preprocess_loraga(model, loraga_lora_config("fastpeft", "mlp"),
                          train_step=lambda: model.lin0(torch.randn(2, 10)).sum()
                          .backward())
    with pytest.raises(ValueError, match="matched no nn.Linear / Conv1D layer"):
        emb = models.make_emb()
        preprocess_loraga(emb, loraga_lora_config("fastpeft", "mlp", target_modules=["emb"]),
                          train_step=lambda: None)
    assert all(p.requires_grad for p in model.parameters()) and model.lin0.weight.grad is None


def test_rank_too_large_for_the_gradient_split_is_refused():
    model = models.make_mlp()
    config = loraga_lora_config("fastpeft", "mlp", r=6)  # 2r = 12 > min(10, 20)
    preprocess_loraga(model, config, train_step=loraga_trainer(model, "mlp"))
    with pytest.raises(ValueError, match=r"needs 2 \* r <= min\(in_features, out_features\) = 10; got r=6"):
        fastpeft.get_peft_model(model, config)
