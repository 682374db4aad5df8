"""IA3, AdaLoRA and RandLoRA on bitsandbytes 4-bit / 8-bit layers (QLoRA-style), against HF PEFT 0.21.2.

These are the registered fastpeft methods HF PEFT 0.21.2 dispatches to bitsandbytes layer classes (its
tuners/*/bnb.py; PVeRA's, RoAd's and HiRA's are tested in tests/methods/test_pvera.py, test_road.py and
test_hira.py). The base is a tiny Llama loaded by transformers
with BitsAndBytesConfig on the CPU (tests/quantised_models.py). Checked: the layer classes chosen, HF file
-> fastpeft -> same file -> HF with equal logits, a training step's outputs and gradients, and merging into
the quantised weights (requantised under the merge policy, exact unmerge; RandLoRA against HF PEFT's own
merge, which HF PEFT refuses for IA3 and AdaLoRA).
"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
import quantised_models as qm
from fastpeft.errors import AdapterStateError, LossyMergeError
from fastpeft.quant import bnb as qbnb
from state_helpers import assert_all_keys_used

import models
from oracle_helpers import assert_files_both_ways, assert_same_training_step

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ia3(lib):
    return lib.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False)


def _adalora(lib):
    return lib.AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, total_step=20, lora_alpha=8,
                             init_lora_weights=False)


def _randlora(lib):
    return lib.RandLoraConfig(target_modules=TARGETS, r=8, randlora_alpha=16, init_weights=False)


CONFIGS = {"ia3": _ia3, "adalora": _adalora, "randlora": _randlora}
MARKERS = {"ia3": "ia3_l", "adalora": "lora_E", "randlora": "randlora_lambda"}
CASES = [(method, bits) for method in CONFIGS for bits in (4, 8)]


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=what)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return qm.save_llama(tmp_path_factory.mktemp("llama64"))


def _is_adapter_key(key: str) -> bool:
    return ".base_layer." not in key and any(tag in key for tag in ("ia3_", "lora_", "vera_", "oft_"))


# HF PEFT's RandLoRA / VeRA layers also list the tuner's shared projections (fastpeft: one copy, on the tuner)
SHARED_VIEWS = (".randlora_A.default", ".randlora_B.default", ".vera_A.default", ".vera_B.default")


def _copy_adapter_tensors(theirs, ours) -> None:
    """HF PEFT's adapter tensors into `ours`: fastpeft holds the same keys, but for HF's layer views of shared
    projections."""
    hf_state, our_state = theirs.state_dict(), ours.state_dict()
    keys = sorted(k for k in our_state if _is_adapter_key(k))
    extra = {k for k in hf_state if _is_adapter_key(k)} - set(keys)
    assert keys and all(k in hf_state for k in keys) and all(k.endswith(SHARED_VIEWS) for k in extra), extra
    with torch.no_grad():
        for key in keys:
            our_state[key].copy_(hf_state[key])


def _pair(method: str, bits: int, folder: str):
    """(fastpeft model, HF model) with HF's adapter moved off its init and copied into fastpeft's."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(qm.load_quantised(folder, bits), CONFIGS[method](peft))
    models.perturb(theirs, seed=1, scale=0.1)
    ours = fastpeft.get_peft_model(qm.load_quantised(folder, bits), CONFIGS[method](fastpeft))
    _copy_adapter_tensors(theirs, ours)
    return ours, theirs


def _adapted_layers(model) -> dict[str, str]:
    base = model.get_base_model()
    return {name: type(module).__name__ for name, module in base.named_modules()
            if name.endswith(tuple(TARGETS))}


@pytest.mark.parametrize("method, bits", CASES)
def test_layer_classes_logits_and_training_step_like_hf(folder, method, bits):
    """The training step runs first: after an eval-mode forward, bitsandbytes 0.50.2 repacks 4-bit weights for
    its CPU inference kernel, which has no backward (gradients through the layer are then lost, in HF PEFT
    too)."""
    ours, theirs = _pair(method, bits, folder)
    assert _adapted_layers(ours) == _adapted_layers(theirs)
    kinds = {qbnb.bnb_kind(m.get_base_layer()) for m in ours.base_model.adapter_layers()}
    assert kinds == {f"{bits}bit"}
    _, grads = assert_same_training_step(ours, theirs, qm.inputs(), close)
    assert any(MARKERS[method] in n and g.abs().max() > 0 for n, g in grads.items())
    assert all(".base_layer." not in n for n in grads)  # the quantised weights stay frozen
    ours.eval(), theirs.eval()
    expected = qm.logits(theirs)
    with theirs.disable_adapter():
        plain = qm.logits(theirs)
    assert (expected - plain).abs().max() > 1e-3  # the adapter matters, so equal logits mean something
    close(qm.logits(ours), expected, "logits")
    with ours.disable_adapter():
        close(qm.logits(ours), plain, "disabled")


@pytest.mark.parametrize("method, bits", CASES)
def test_files_both_ways(folder, tmp_path, method, bits):
    _, theirs = _pair(method, bits, folder)
    assert_files_both_ways(theirs, lambda: qm.load_quantised(folder, bits), qm.inputs(), tmp_path,
                           lambda a, b, what: close(a, b, what))


@pytest.mark.parametrize("bits", [4, 8])
def test_ia3_widens_half_inputs_as_hf(folder, bits):
    """A bfloat16 input is scaled in float32 and run through the quantised layer as HF PEFT does; fastpeft
    hands the result back in bfloat16 (HF PEFT returns float32): the same values up to that last rounding."""
    ours, theirs = _pair("ia3", bits, folder)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        mine, hf = ours.get_base_model().get_submodule(name), theirs.get_base_model().get_submodule(name)
        width = mine.get_base_layer().in_features
        with torch.no_grad():
            out, expected = mine(x[..., :width]), hf(x[..., :width])
        assert out.dtype == torch.bfloat16 and expected.dtype == torch.float32
        assert torch.equal(out, expected.to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------------- merging
def _quantised_state(model) -> dict[str, torch.Tensor]:
    """Raw quantised weights (and their 4-bit scales) of the adapted layers."""
    state = {}
    for layer in model.base_model.adapter_layers():
        weight = layer.get_base_layer().weight
        state[id(layer)] = weight.data.clone()
        if qbnb.param_kind(weight) == "4bit":
            state[(id(layer), "absmax")] = weight.quant_state.absmax.clone()
    return state


@pytest.mark.parametrize("method, bits", CASES)
def test_merge_requantises_under_the_policy_and_unmerges_exactly(folder, method, bits):
    ours, _ = _pair(method, bits, folder)
    expected, before = qm.logits(ours), _quantised_state(ours)
    with pytest.raises(LossyMergeError, match="Pass allow_lossy_merge=True"):
        ours.base_model.merge_adapter(max_merge_error=0.0)
    assert not any(layer.merged for layer in ours.base_model.adapter_layers())
    with qbnb.merge_policy(allow_lossy=True):  # an enclosing policy applies too
        ours.base_model.merge_adapter(max_merge_error=0.0)
    assert all(layer.merged for layer in ours.base_model.adapter_layers())
    merged = qm.logits(ours)
    with ours.disable_adapter():
        plain = qm.logits(ours)  # disabling unmerges
    relative = (merged - expected).norm() / (expected - plain).norm()
    # requantising costs some of the adapter's effect, not most
    assert relative < (0.5 if bits == 4 else 0.05)
    after = _quantised_state(ours)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    close(qm.logits(ours), expected, "unmerged")


@pytest.mark.parametrize("method", ["ia3", "randlora"])
def test_a_refusal_in_a_later_layer_takes_back_the_earlier_merges(folder, method):
    """Merges are all or nothing: the error bound is set between the layers' errors, so some layers merge
    before one refuses; merge_adapter and merge_and_unload then leave every layer (and the model) as it
    was."""
    ours, _ = _pair(method, 4, folder)
    expected, before = qm.logits(ours), _quantised_state(ours)
    errors = []
    for layer in ours.base_model.adapter_layers():
        start, weight, _ = layer._merge_plan(["default"], False)
        base = layer.get_base_layer()
        errors.append(qbnb.measure_error(
            weight, qbnb.dequantize_param(base, qbnb.quantized_param(base, weight)), weight - start).output)
    bound = (min(errors) + max(errors)) / 2
    assert min(errors) < bound < max(errors)
    for call in (ours.base_model.merge_adapter, ours.merge_and_unload):
        with pytest.raises(LossyMergeError):
            call(max_merge_error=bound, max_adapter_loss=1e9)
        assert not any(layer.merged for layer in ours.base_model.adapter_layers())
        after = _quantised_state(ours)
        assert all(torch.equal(after[k], before[k]) for k in before)
        close(qm.logits(ours), expected, "after the refusal")


@pytest.mark.parametrize("method, bits", CASES)
def test_merge_and_unload_dequantized_matches_hf_dense_merge(folder, method, bits):
    """merge_and_unload(dequantize=True) gives dense nn.Linear layers holding what HF PEFT's own
    dense merge makes of the same adapter on a float copy of the dequantised weights. (HF PEFT's bitsandbytes
    RandLoRA merge multiplies its two factors in the wrong order, and it has none for IA3 / AdaLoRA, so its
    quantised merge is no oracle.)"""
    ours, theirs = _pair(method, bits, folder)
    # first: bitsandbytes' CPU kernel repacks 4-bit weights (bf16 scales) on first use
    adapted = qm.logits(ours)
    with ours.disable_adapter():
        plain = qm.logits(ours)
    names = list(_adapted_layers(ours))
    dense = qm.make_llama()
    with torch.no_grad():
        for name in names:
            dense.get_submodule(name).weight.copy_(qbnb.dequantize_weight(ours.get_base_model().get_submodule(
                name).get_base_layer()))
    hf_dense = peft.get_peft_model(dense, CONFIGS[method](peft))
    adapter = {k: v for k, v in theirs.state_dict().items() if _is_adapter_key(k)}
    assert_all_keys_used(hf_dense.load_state_dict(adapter, strict=False), _is_adapter_key)
    expected = hf_dense.merge_and_unload()
    merged = ours.merge_and_unload(dequantize=True)
    assert not any(qbnb.bnb_kind(m) for m in merged.modules())  # the other quantised layers are dense too
    for name in names:
        assert type(merged.get_submodule(name)) is torch.nn.Linear
        close(merged.get_submodule(name).weight, expected.get_submodule(name).weight, name)
    # the adapter's effect is kept up to the quantised kernels' own rounding (bitsandbytes' int8 matmul
    # quantises the activations too; its 4-bit CPU kernel computes in bfloat16)
    assert (qm.logits(merged) - adapted).norm() < 0.1 * (adapted - plain).norm()


@pytest.mark.parametrize("method, error, match", [("ia3", ValueError, "Cannot merge ia3 layers"),
                                                  ("adalora", NotImplementedError, "")])
def test_hf_refuses_merging_ia3_and_adalora_into_quantised_layers(folder, method, error, match):
    """The deliberate difference: fastpeft merges these too (under the merge policy), HF PEFT cannot."""
    _, theirs = _pair(method, 4, folder)
    with pytest.raises(error, match=match):
        theirs.merge_and_unload()


OTHER_METHODS = {"vera": lambda lib: lib.VeraConfig(target_modules=TARGETS[:2], r=8, init_weights=False),
                 "oft": lambda lib: lib.OFTConfig(target_modules=TARGETS[:2], r=0, oft_block_size=8,
                                                  init_weights=False)}


@pytest.mark.parametrize("method, bits", [("vera", 4), ("vera", 8), ("oft", 8)])
def test_other_methods_run_on_quantised_layers_but_refuse_to_merge(folder, method, bits):
    """Methods without bitsandbytes layers wrap them as plain linear layers (as HF PEFT does): the forward
    matches HF PEFT's, but a merge would break the packed 4-bit tensor or silently corrupt the int8 one, so it
    is refused before anything changes."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(qm.load_quantised(folder, bits), OTHER_METHODS[method](peft))
    models.perturb(theirs, seed=1, scale=0.1)
    ours = fastpeft.get_peft_model(qm.load_quantised(folder, bits), OTHER_METHODS[method](fastpeft))
    _copy_adapter_tensors(theirs, ours)
    expected = qm.logits(theirs)
    close(qm.logits(ours), expected, "logits")
    # after the first forward (bitsandbytes' CPU kernel repacks 4-bit weights)
    before = _quantised_state(ours)
    for call in (ours.base_model.merge_adapter, ours.merge_and_unload):
        with pytest.raises(AdapterStateError, match=f"Cannot merge {method} adapter.*bitsandbytes {bits}bit"):
            call()
    assert not any(layer.merged for layer in ours.base_model.adapter_layers())
    after = _quantised_state(ours)
    assert all(torch.equal(after[k], before[k]) for k in before)
    close(qm.logits(ours), expected, "after the refusal")
