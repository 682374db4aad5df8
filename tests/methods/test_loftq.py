"""LoftQ (init_lora_weights='loftq', LoftQConfig) against HF PEFT 0.21.2.

HF PEFT 0.21.2 quantises through bitsandbytes on CUDA (peft/utils/loftq_utils.py: Params4bit NF4 with blocks
of 64, Int8Params vector-wise int8), neither of which exists here. To still run HF PEFT's own LoftQ code (its
loop, SVD split, factor assignment, load path) as the oracle, `hf_loftq_env` gives HF a stand-in for the four
bitsandbytes calls it makes, written in this file from bitsandbytes' documented semantics and independently of
fastpeft (NF4 levels derived from the normal quantile function, nearest level by brute-force distance, block
by block), and keeps HF's "cuda" tensors on the CPU. tests/methods/test_loftq_bnb.py compares fastpeft's
NF4/int8 bit for bit with bitsandbytes 0.50.2 and LoftQ with HF PEFT's on real bitsandbytes.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types

import peft
import pytest
import torch
from peft.utils import loftq_utils as hf_loftq
from safetensors.torch import load_file
from torch import nn

import fastpeft
import quantised_models as qm
from fastpeft.methods.lora.inits.loftq import NF4_LEVELS, nf4_roundtrip, rank_r_fit
from fastpeft.methods.lora.inits.loftq_config import LoftQConfig
from fastpeft.methods.lora.inits.loftq_replace import replace_lora_weights_loftq

import models

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "down_proj"]}


# ------------------------------------------------------------------------------- stand-in for bitsandbytes
def _nf4_levels_by_definition() -> torch.Tensor:
    """QLoRA appendix E: quantiles of N(0, 1) at 8 evenly spaced probabilities in [0.5, 0.9677083) above and 7
    below zero, plus 0, scaled so the largest is 1."""
    top = 0.9677083
    upper = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    lower = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([upper, lower, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.max()).float()


class _Params4bit:
    def __init__(self, data, requires_grad=False, compress_statistics=False, quant_type="nf4"):
        assert quant_type == "nf4" and not compress_statistics and not requires_grad
        self.source = data

    def to(self, device):
        flat, levels = self.source.reshape(-1).float(), _nf4_levels_by_definition()
        codes, scales = [], []
        for start in range(0, flat.numel(), 64):
            block = flat[start:start + 64]
            scale = block.abs().max()
            codes.append(((block * (1.0 / scale))[:, None] - levels[None, :]).abs().argmin(dim=1))
            scales.append(scale)
        self.data = torch.cat(codes)
        self.quant_state = (scales, self.source.shape)
        return self


def _dequantize_4bit(codes, quant_state):
    scales, shape = quant_state
    levels = _nf4_levels_by_definition()
    blocks = [levels[codes[i * 64:(i + 1) * 64]] * scale for i, scale in enumerate(scales)]
    return torch.cat(blocks).view(shape)


class _Int8Params:
    def __init__(self, data, requires_grad=False):
        self.source = data

    def to(self, device):
        half = self.source.to(torch.float16).float()
        self.SCB = half.abs().amax(dim=1)
        self.data = torch.round(half * (127.0 / self.SCB[:, None])).to(torch.int8)
        return self


def _int8_vectorwise_dequant(codes, row_absmax):
    return codes.float() * row_absmax[:, None] / 127.0


@pytest.fixture
def hf_loftq_env(monkeypatch):
    """HF PEFT's LoftQ path, runnable here: stand-in bitsandbytes, CUDA moves kept on the CPU."""
    import peft.import_utils as hf_imports

    hf_imports.is_bnb_available(), hf_imports.is_bnb_4bit_available()  # HF's other paths keep seeing "no bnb"
    bnb = types.ModuleType("bitsandbytes")
    bnb.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    bnb.nn = types.SimpleNamespace(Params4bit=_Params4bit, Int8Params=_Int8Params)
    bnb.functional = types.SimpleNamespace(dequantize_4bit=_dequantize_4bit,
                                           int8_vectorwise_dequant=_int8_vectorwise_dequant)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setattr(hf_loftq, "is_bnb_available", lambda: True)
    monkeypatch.setattr(hf_loftq, "is_bnb_4bit_available", lambda: True)
    monkeypatch.setattr(hf_loftq, "clear_device_cache", lambda: None)
    qm.keep_device_moves_on_cpu(monkeypatch)


# ------------------------------------------------------------------------------- helpers
def _loftq_cls(lib):
    return LoftQConfig if lib is fastpeft else lib.LoftQConfig  # fastpeft's is not exported at top level yet


def _config(lib, model: str, bits: int = 4, rounds: int = 1, **kw):
    kw = {"target_modules": TARGETS[model], "r": 4, "lora_alpha": 4, "init_lora_weights": "loftq",
          "loftq_config": _loftq_cls(lib)(loftq_bits=bits, loftq_iter=rounds), **kw}
    return lib.LoraConfig(**kw)


def _pair(model: str, dtype=torch.float32, **kw):
    factory, inputs = models.MODELS[model]
    fp = fastpeft.get_peft_model(factory().to(dtype), _config(fastpeft, model, **kw))
    hf = peft.get_peft_model(factory().to(dtype), _config(peft, model, **kw))
    return fp, hf, inputs()


def _assert_same_state(fp, hf, atol=1e-5, rtol=1e-4):
    ours, theirs = fp.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=rtol, msg=key)


# ------------------------------------------------------------------------------- config
def test_loftq_config_fields_and_lora_config_match_hf():
    ours = {f: getattr(LoftQConfig(), f) for f in ("loftq_bits", "loftq_iter")}
    assert ours == vars(peft.LoftQConfig())
    fp, hf = _config(fastpeft, "mlp", bits=8, rounds=3), _config(peft, "mlp", bits=8, rounds=3)
    assert fp.loftq_config == hf.loftq_config == {"loftq_bits": 8, "loftq_iter": 3}
    assert fp.to_dict()["loftq_config"] == hf.to_dict()["loftq_config"]
    as_dict = fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 2})
    assert as_dict.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}


def test_config_files_both_directions(tmp_path):
    _config(peft, "mlp", bits=8, rounds=2).save_pretrained(tmp_path / "hf")
    loaded = fastpeft.LoraConfig.from_pretrained(tmp_path / "hf")
    assert (loaded.init_lora_weights, loaded.loftq_config) == ("loftq", {"loftq_bits": 8, "loftq_iter": 2})
    _config(fastpeft, "mlp", bits=8, rounds=2).save_pretrained(tmp_path / "fp")
    back = peft.LoraConfig.from_pretrained(tmp_path / "fp")
    assert (back.init_lora_weights, back.loftq_config) == ("loftq", {"loftq_bits": 8, "loftq_iter": 2})
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "fp")]
    assert saved[0]["loftq_config"] == saved[1]["loftq_config"]


def test_loftq_config_without_loftq_is_cleared_as_in_hf(caplog):
    with pytest.warns(UserWarning, match="loftq_config"):
        hf = peft.LoraConfig(loftq_config=peft.LoftQConfig())
    with caplog.at_level(logging.WARNING):
        fp = fastpeft.LoraConfig(loftq_config=LoftQConfig())
    assert fp.loftq_config == hf.loftq_config == {}
    assert "loftq_config is ignored" in caplog.text


def test_missing_loftq_config_refused_as_in_hf():
    with pytest.raises(ValueError, match="loftq_config"):
        peft.LoraConfig(init_lora_weights="loftq")
    for empty in (None, {}):
        with pytest.raises(ValueError, match="needs loftq_config: pass loftq_config=LoftQConfig"):
            fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config=empty)


@pytest.mark.parametrize("settings, hf_message, ours", [
    ({"loftq_bits": 2}, "Only nf4 and int8", r"loftq_bits=2 is not supported; use one of \[4, 8\]"),
    ({"loftq_bits": 3}, "Only nf4 and int8", r"loftq_bits=3 is not supported"),
    ({"loftq_iter": 0}, "greater than 0", r"loftq_iter must be an integer >= 1, got 0"),
])
def test_bad_bits_or_rounds_refused_as_in_hf(hf_loftq_env, settings, hf_message, ours):
    hf_config = peft.LoraConfig(target_modules=["lin0"], init_lora_weights="loftq",
                                loftq_config=peft.LoftQConfig(**settings))
    with pytest.raises(ValueError, match=hf_message):  # HF refuses when the layers are built
        peft.get_peft_model(models.make_mlp(), hf_config)
    with pytest.raises(ValueError, match=ours):  # fastpeft already when the config is built
        fastpeft.LoraConfig(target_modules=["lin0"], init_lora_weights="loftq",
                            loftq_config=LoftQConfig(**settings))


@pytest.mark.parametrize("model, target, kind", [("emb", "emb", "Embedding"), ("conv2d", "conv0", "Conv2d")])
def test_non_linear_layers_refused(model, target, kind):
    base = models.MODELS[model][0]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = fastpeft.LoraConfig(target_modules=[target], r=2, init_lora_weights="loftq",
                                 loftq_config=LoftQConfig())
    with pytest.raises(ValueError,
                       match=f"init_lora_weights='loftq' works on linear layers .* not on {kind}"):
        fastpeft.get_peft_model(base, config)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_rank_above_layer_size_refused():
    config = fastpeft.LoraConfig(target_modules=["lin0"], r=16, lora_alpha=16, init_lora_weights="loftq",
                                 loftq_config=LoftQConfig())
    with pytest.raises(ValueError, match=r"needs r <= min\(in_features, out_features\) = 10"):
        fastpeft.get_peft_model(models.make_mlp(), config)


def test_replace_lora_weights_loftq_needs_a_4bit_lora_model():
    """The function itself is tested against HF PEFT's on real bitsandbytes models in test_loftq_bnb.py."""
    with pytest.raises(TypeError, match="expects a PeftModel"):
        replace_lora_weights_loftq(None)
    plain = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp"))
    with pytest.raises(ValueError, match="no LoRA layer of adapter 'default' over a bitsandbytes 4-bit"):
        replace_lora_weights_loftq(plain)


# ------------------------------------------------------------------------------- against HF PEFT's LoftQ
def test_nf4_levels_are_qlora_normal_quantiles():
    torch.testing.assert_close(torch.tensor(NF4_LEVELS), _nf4_levels_by_definition(), atol=2e-7, rtol=0)


def test_rank_r_fit_matches_hf_low_rank_decomposition():
    residual = torch.randn(24, 40)
    left, right = rank_r_fit(residual, 5)
    expected = hf_loftq._low_rank_decomposition(residual, reduced_rank=5)
    torch.testing.assert_close(left, expected["L"])
    torch.testing.assert_close(right, expected["R"])


@pytest.mark.parametrize("model, bits, rounds", [("mlp", 4, 1), ("mlp", 4, 3), ("mlp", 8, 2), ("llama", 4, 2),
                                                  ("llama", 8, 1)])
def test_quantised_base_factors_and_outputs_match_hf(hf_loftq_env, model, bits, rounds):
    fp, hf, inputs = _pair(model, bits=bits, rounds=rounds)
    _assert_same_state(fp, hf)
    torch.testing.assert_close(models.forward(fp, inputs), models.forward(hf, inputs), atol=1e-5, rtol=1e-4)
    original = models.MODELS[model][0]().state_dict()
    changed = [k for k, v in fp.get_base_model().state_dict().items()
               if ".base_layer." in k and not torch.equal(v, original[k.replace(".base_layer", "")])]
    assert changed, "LoftQ must replace the target weights by their quantisation"


def test_scaling_not_one_and_bfloat16_base_match_hf(hf_loftq_env, caplog):
    """HF PEFT sets B A to W - Q whatever lora_alpha / r is (fastpeft warns); a bf16 base stays bf16."""
    with caplog.at_level(logging.WARNING):
        fp, hf, inputs = _pair("mlp", dtype=torch.bfloat16, bits=4, rounds=2, lora_alpha=8)
    assert "without dividing by the LoRA scaling" in caplog.text
    assert fp.base_model.model.lin0.base_layer.weight.dtype == torch.bfloat16
    _assert_same_state(fp, hf, atol=1e-5, rtol=8e-3)  # float32 ulps may flip a factor entry by one bf16 step
    torch.testing.assert_close(models.forward(fp, inputs.bfloat16()), models.forward(hf, inputs.bfloat16()))


def test_files_both_directions(hf_loftq_env, tmp_path):
    """Both libraries re-run LoftQ on the original base when loading a 'loftq' adapter, then load A and B."""
    fp, hf, inputs = _pair("mlp", bits=4, rounds=2)
    fp.save_pretrained(tmp_path / "fp")
    hf.save_pretrained(tmp_path / "hf")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fp", "hf"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4, msg=key)
    in_hf = peft.PeftModel.from_pretrained(models.make_mlp(), tmp_path / "fp")
    in_fp = fastpeft.PeftModel.from_pretrained(models.make_mlp(), tmp_path / "hf")
    expected = models.forward(fp, inputs)
    torch.testing.assert_close(models.forward(in_hf, inputs), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(models.forward(in_fp, inputs), models.forward(hf, inputs),
                               atol=1e-5, rtol=1e-4)
    _assert_same_state(in_fp, in_hf)


def test_saved_as_plain_lora_loads_in_hf_onto_the_quantised_base(tmp_path):
    """HF's documented LoftQ workflow: keep the quantised base, save the adapter with init_lora_weights=True.
    Real HF PEFT (no stand-in needed) then loads it and gives fastpeft's outputs."""
    fp = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", bits=4, rounds=2))
    inputs = models.mlp_inputs()
    expected = models.forward(fp, inputs)
    fp.peft_config["default"].init_lora_weights = True
    fp.save_pretrained(tmp_path)
    quantised_base = models.make_mlp()
    quantised_base.load_state_dict(fp.unload().state_dict())
    hf = peft.PeftModel.from_pretrained(quantised_base, tmp_path)
    torch.testing.assert_close(models.forward(hf, inputs), expected, atol=1e-5, rtol=1e-4)


def test_loading_a_loftq_adapter_onto_the_quantised_base_keeps_it(tmp_path):
    """Loading re-runs LoftQ (as HF PEFT); on an already quantised base that changes nothing (NF4 is
    idempotent)."""
    fp = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp", bits=4, rounds=3))
    inputs = models.mlp_inputs()
    expected = models.forward(fp, inputs)
    fp.save_pretrained(tmp_path)
    quantised = fp.unload().state_dict()
    base = models.make_mlp()
    base.load_state_dict(quantised)
    loaded = fastpeft.PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(v, quantised[k]) for k, v in loaded.unload().state_dict().items())
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), tmp_path)
    torch.testing.assert_close(models.forward(loaded, inputs), expected, atol=0, rtol=0)


def test_conversion_on_save_refused_as_in_hf(tmp_path):
    fp = fastpeft.get_peft_model(models.make_mlp(), _config(fastpeft, "mlp"))
    with pytest.raises(ValueError, match="loftq"):
        fp.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))


# ------------------------------------------------------------------------------- the stated property
@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_error_below_plain_quantisation(bits):
    torch.manual_seed(3)
    layer = nn.Sequential(nn.Linear(64, 48))
    weight = layer[0].weight.detach().clone()
    config = fastpeft.LoraConfig(target_modules=["0"], r=8, lora_alpha=8, init_lora_weights="loftq",
                                 loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=2))
    lora = fastpeft.get_peft_model(layer, config).base_model.model[0]
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    fitted = lora.base_layer.weight + lora.scaling["default"] * b @ a
    plain = _Params4bit(weight).to("cpu") if bits == 4 else _Int8Params(weight).to("cpu")
    plain = (_dequantize_4bit(plain.data, plain.quant_state) if bits == 4
             else _int8_vectorwise_dequant(plain.data, plain.SCB))
    assert (weight - fitted).norm() < 0.95 * (weight - plain).norm()


def test_conv1d_factors_in_lora_layout():
    """GPT-2's Conv1D stores (in, out); fastpeft transposes LoftQ's factors (HF PEFT 0.21 assigns them
    untransposed, mis-shaped unless in == out), so merging gives W back more closely than the quantised
    base."""
    base = models.make_conv1d_gpt2()
    original = base.c_fc.weight.detach().clone()
    config = fastpeft.LoraConfig(target_modules=["c_fc"], r=4, lora_alpha=4, init_lora_weights="loftq",
                                 loftq_config=LoftQConfig())
    model = fastpeft.get_peft_model(base, config)
    layer = model.base_model.model.c_fc
    assert layer.lora_A["default"].weight.shape == (4, 10) and layer.lora_B["default"].weight.shape == (24, 4)
    quantised = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(quantised, nf4_roundtrip(original), atol=0, rtol=0)
    merged = model.merge_and_unload().c_fc.weight
    assert (original - merged).norm() < 0.95 * (original - quantised).norm()
