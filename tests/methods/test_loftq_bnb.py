"""LoftQ against real bitsandbytes 0.50.2 (CPU) and HF PEFT 0.21.2.

1. fastpeft's NF4 / int8 quantisers (pure PyTorch, loftq.py) against bitsandbytes' own, bit for bit.
2. init_lora_weights='loftq' against HF PEFT's LoftQ, which quantises through real bitsandbytes.
3. replace_lora_weights_loftq on 4-bit models loaded by transformers with BitsAndBytesConfig, against HF
   PEFT's.

HF PEFT's LoftQ code moves tensors to "cuda" (or "xpu") for the SVD; `hf_on_cpu` keeps those moves on the CPU
and changes nothing else (the bitsandbytes calls are the real ones).
"""

from __future__ import annotations

import bitsandbytes as bnb
import peft
import pytest
import torch
from bitsandbytes import functional as bnb_f
from peft.utils import loftq_utils as hf_loftq

import fastpeft
import quantised_models as qm
from fastpeft.errors import AdapterFileNotFoundError
from fastpeft.methods.lora.inits.loftq import NF4_LEVELS, int8_roundtrip, nf4_roundtrip
from fastpeft.methods.lora.inits.loftq_config import LoftQConfig
from fastpeft.methods.lora.inits.loftq_replace import replace_lora_weights_loftq

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture
def hf_on_cpu(monkeypatch):
    qm.keep_device_moves_on_cpu(monkeypatch)
    monkeypatch.setattr(hf_loftq, "clear_device_cache", lambda: None)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return qm.save_llama(tmp_path_factory.mktemp("llama64"))


# ---------------------------------------------------------------------------------------------- quantisers
def _weights(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows of very mixed scale
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]
    w.view(-1)[:64] = 0.0  # an all-zero block
    return w


def _ties(rows: int) -> torch.Tensor:
    """Blocks made of the exact midpoints between NF4 levels (scaled by the block's absmax 1)."""
    levels = torch.tensor(NF4_LEVELS)
    mids = (levels[:-1] + levels[1:]) / 2
    block = torch.cat([mids, -mids, torch.tensor([1.0]), torch.zeros(64 - 31)])
    return block.repeat(rows, 1)


def _bnb_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Quantise and dequantise as HF PEFT's LoftQ does (Params4bit, blocks of 64, no double quantisation)."""
    param = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    return bnb_f.dequantize_4bit(param.data, param.quant_state)


@pytest.mark.parametrize("shape", [(64, 128), (48, 64), (3, 192), (128, 64)])
def test_nf4_equals_bitsandbytes_bit_for_bit(shape):
    for weight in (_weights(shape, 0), torch.randn(shape) * 1e-4,
                   _ties(shape[0] * shape[1] // 64).view(shape)):
        ours = nf4_roundtrip(weight)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, _bnb_nf4(weight))


@pytest.mark.parametrize("shape", [(24, 40), (7, 9), (10, 20)])
def test_nf4_blocks_run_over_the_flattened_weight_as_bitsandbytes_quantises(shape):
    """Rows shorter than a block: bitsandbytes quantises the flattened weight (blocks cross rows). Its CPU
    kernel dequantises 2-D tensors of such shapes row by row, so the dequantised reference is taken on the
    flat codes."""
    weight = _weights(shape, 1)
    codes, state = bnb_f.quantize_4bit(weight.reshape(-1), blocksize=64, quant_type="nf4")
    expected = bnb_f.dequantize_4bit(codes, state).view(shape)
    assert torch.equal(nf4_roundtrip(weight), expected)
    codes_2d, state_2d = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(codes_2d.reshape(-1), codes.reshape(-1)) and torch.equal(state_2d.absmax, state.absmax)


@pytest.mark.parametrize("shape, dtype", [((48, 64), torch.float32), ((10, 20), torch.float32),
                                          ((7, 9), torch.bfloat16), ((64, 128), torch.float16)])
def test_int8_equals_bitsandbytes_bit_for_bit(shape, dtype):
    weight = _weights(shape, 2).to(dtype)
    weight[3] = 0.0  # an all-zero row
    param = bnb.nn.Int8Params(weight, requires_grad=False).to("cpu")
    expected = bnb_f.int8_vectorwise_dequant(param.data, param.SCB)
    assert torch.equal(int8_roundtrip(weight), expected)


# ---------------------------------------------------------------------------------- init_lora_weights="loftq"
def _loftq_config(lib, targets, bits, rounds):
    loftq = LoftQConfig if lib is fastpeft else lib.LoftQConfig
    return lib.LoraConfig(target_modules=targets, r=4, lora_alpha=4, init_lora_weights="loftq",
                          loftq_config=loftq(loftq_bits=bits, loftq_iter=rounds))


def _assert_same_state(ours, theirs):
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        exact = ".base_layer." in key or "lora_" not in key  # the quantised base: bit for bit
        tol = {"atol": 0, "rtol": 0} if exact else {"atol": 1e-6, "rtol": 1e-5}
        torch.testing.assert_close(ours[key], value, msg=key, **tol)


@pytest.mark.parametrize("bits, rounds", [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_loftq_init_matches_hf_with_real_bitsandbytes(hf_on_cpu, bits, rounds):
    targets = ["lin0", "lin1"]
    ours = fastpeft.get_peft_model(qm.MLP64(), _loftq_config(fastpeft, targets, bits, rounds))
    theirs = peft.get_peft_model(qm.MLP64(), _loftq_config(peft, targets, bits, rounds))
    _assert_same_state(ours, theirs)
    x = qm.mlp64_inputs()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


def test_loftq_init_on_llama_matches_hf_and_files_load_both_ways(hf_on_cpu, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = fastpeft.get_peft_model(qm.make_llama(), _loftq_config(fastpeft, targets, 4, 1))
    theirs = peft.get_peft_model(qm.make_llama(), _loftq_config(peft, targets, 4, 1))
    _assert_same_state(ours, theirs)
    expected = qm.logits(theirs)
    torch.testing.assert_close(qm.logits(ours), expected, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "fp")
    theirs.save_pretrained(tmp_path / "hf")
    in_hf = peft.PeftModel.from_pretrained(qm.make_llama(), tmp_path / "fp")  # re-runs LoftQ, loads A and B
    in_fp = fastpeft.PeftModel.from_pretrained(qm.make_llama(), tmp_path / "hf")
    torch.testing.assert_close(qm.logits(in_hf), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qm.logits(in_fp), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- replace_lora_weights_loftq
def _four_bit_lora(lib, folder, **kw):
    config = lib.LoraConfig(target_modules=LLAMA_TARGETS, r=4, lora_alpha=4, **kw)
    base = qm.load_quantised(folder, 4)
    torch.manual_seed(0)  # the same initial A in both libraries (kept where a callback reverts)
    return lib.get_peft_model(base, config)


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _assert_same_lora(ours, theirs):
    ours, theirs = _lora_tensors(ours), _lora_tensors(theirs)
    assert ours.keys() == theirs.keys() and ours
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("path_given", [True, False])
def test_replace_matches_hf(hf_on_cpu, llama_folder, path_given):
    ours, theirs = _four_bit_lora(fastpeft, llama_folder), _four_bit_lora(peft, llama_folder)
    before = _lora_tensors(ours)
    if path_given:
        replace_lora_weights_loftq(ours, model_path=llama_folder)
    else:  # the public name; the folder the base was loaded from (config._name_or_path)
        fastpeft.replace_lora_weights_loftq(ours)
    peft.replace_lora_weights_loftq(theirs, model_path=llama_folder)  # HF needs model_path for a local folder
    _assert_same_lora(ours, theirs)
    changed = [k for k, v in _lora_tensors(ours).items() if not torch.equal(v, before[k])]
    assert len(changed) == 2 * len(LLAMA_TARGETS)
    torch.testing.assert_close(qm.logits(ours), qm.logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("forward_first", [False, True])
def test_replace_fits_the_quantisation_error(llama_folder, forward_first):
    """Per layer, base + B A is closer to the original weight than the quantised base alone (lora_alpha == r).
    bitsandbytes' CPU kernel repacks 4-bit weights on the first forward (absmax rounded to bfloat16); the fit
    is then taken against the repacked weight, which HF PEFT's function would read in the packed layout."""
    from fastpeft.quant.bnb import dequantize_weight

    model = _four_bit_lora(fastpeft, llama_folder)
    if forward_first:
        qm.logits(model)
    replace_lora_weights_loftq(model, model_path=llama_folder)
    original = qm.make_llama().state_dict()
    layers = [(n, m) for n, m in model.get_base_model().named_modules() if n.endswith(tuple(LLAMA_TARGETS))]
    assert len(layers) == len(LLAMA_TARGETS)
    for name, layer in layers:
        w, q = original[f"{name}.weight"], dequantize_weight(layer.get_base_layer())
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert (w - q - b @ a).norm() < 0.99 * (w - q).norm()


def test_callback_keeps_or_reverts_each_layer_as_hf(hf_on_cpu, llama_folder):
    def make_callback(seen):
        def callback(model, name):
            seen.append(name)
            return "up_proj" in name or "q_proj" in name
        return callback

    ours, theirs = _four_bit_lora(fastpeft, llama_folder), _four_bit_lora(peft, llama_folder)
    before = _lora_tensors(ours)
    seen_ours, seen_hf = [], []
    replace_lora_weights_loftq(ours, model_path=llama_folder, callback=make_callback(seen_ours))
    peft.replace_lora_weights_loftq(theirs, model_path=llama_folder, callback=make_callback(seen_hf))
    assert seen_ours == seen_hf and len(seen_ours) == len(LLAMA_TARGETS)
    _assert_same_lora(ours, theirs)
    after = _lora_tensors(ours)
    for key in after:
        kept = "up_proj" in key or "q_proj" in key
        assert torch.equal(after[key], before[key]) != kept, key


def test_sharded_and_prefixless_files_as_hf(hf_on_cpu, tmp_path, llama_folder):
    """Weights split into shards (model.safetensors.index.json), or saved from the inner LlamaModel (keys
    without the 'model.' prefix of LlamaForCausalLM): both read as HF PEFT reads them."""
    reference = _four_bit_lora(fastpeft, llama_folder)
    replace_lora_weights_loftq(reference, model_path=llama_folder)
    qm.make_llama().save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    qm.make_llama().model.save_pretrained(tmp_path / "inner")
    for folder in ("sharded", "inner"):
        ours, theirs = _four_bit_lora(fastpeft, llama_folder), _four_bit_lora(peft, llama_folder)
        replace_lora_weights_loftq(ours, model_path=str(tmp_path / folder))
        peft.replace_lora_weights_loftq(theirs, model_path=str(tmp_path / folder))
        _assert_same_lora(ours, theirs)
        _assert_same_lora(ours, reference)


def test_replace_refusals(tmp_path, llama_folder):
    model = _four_bit_lora(fastpeft, llama_folder)
    before = _lora_tensors(model)
    with pytest.raises(AdapterFileNotFoundError, match="neither model.safetensors nor"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="no adapter 'other'"):
        replace_lora_weights_loftq(model, model_path=llama_folder, adapter_name="other")
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError,
                       match=r"has shape \(8, 8\) in the weights file but the quantised layer is"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in _lora_tensors(model).items())
    eight_bit = fastpeft.get_peft_model(qm.load_quantised(llama_folder, 8),
                                        fastpeft.LoraConfig(target_modules=LLAMA_TARGETS, r=4))
    with pytest.raises(ValueError, match="8-bit Linear8bitLt bases are not supported"):
        replace_lora_weights_loftq(eight_bit, model_path=llama_folder)
    too_high = _four_bit_lora(fastpeft, llama_folder, rank_pattern={"q_proj": 80})
    with pytest.raises(ValueError,
                       match=r"r=80 on 'model.layers.0.self_attn.q_proj', above min\(out, in\) = 64"):
        replace_lora_weights_loftq(too_high, model_path=llama_folder)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_init_on_an_already_quantised_model_points_to_replace(llama_folder, bits):
    config = _loftq_config(fastpeft, ["q_proj"], 4, 1)
    with pytest.raises(TypeError, match=r"already a bitsandbytes .*replace_lora_weights_loftq\(peft_model\)"):
        fastpeft.get_peft_model(qm.load_quantised(llama_folder, bits), config)
