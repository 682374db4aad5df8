"""The base model's dtype as a column of the contract matrix: every row of METHOD_CASES on a float32,
bfloat16 and float16 base, with `get_peft_model`'s default autocast_adapter_dtype=True.

HF PEFT 0.21.2 is the oracle for what users of a half-precision base expect: which adapter tensors are widened
to float32 (its docs: only float16 / bfloat16 tensors, and only for some tuners), the output's dtype and
values, and the merged base weights. Both libraries get the same adapter values: the row's float32 adapter
moved off its init, loaded with set_peft_model_state_dict. On top: the adapter visibly acts in that dtype,
gradients reach every trainable tensor (in the tensor's own dtype) and no frozen one, the merged model gives
the adapted outputs and unmerging gives the base weights back to within the dtype's rounding.

Tolerances are in units of the dtype's machine epsilon times the largest output or weight. Measured over all
rows and dtypes: outputs within 1.4 eps of HF PEFT's and 2.5 eps of the float32 adapter's, merged weights
within 1.9 eps of HF PEFT's, merged outputs within 4.1 eps of the unmerged ones, unmerged weights within
4.3 eps of the originals.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch

import fastpeft

import models
from cases import METHOD_CASES, PROMPT_CASES, config_class, perturb
from models import MODELS, forward
from prompt_helpers import make_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only spins

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_EPS, REF_EPS, MERGED_WEIGHT_EPS, MERGE_EPS, UNMERGE_EPS = 4, 4, 3, 8, 8


def _hf_config(case):
    kwargs = copy.deepcopy(case.kwargs)
    if "task_type" in kwargs:
        kwargs["task_type"] = getattr(peft.TaskType, kwargs["task_type"])
    return getattr(peft, case.method)(**kwargs)


@functools.cache
def _reference(case_id: str):
    """(adapter state, float32 outputs, float32 adapter effect) of the row's float32 adapter off its init."""
    case = next(c for c in METHOD_CASES if c.id == case_id)
    config = config_class(case.method)(**copy.deepcopy(case.kwargs))
    model = fastpeft.get_peft_model(MODELS[case.model][0](), config)
    perturb(model)
    model.eval()
    inputs = MODELS[case.model][1]()
    out = forward(model, inputs)
    with model.disable_adapter():
        effect = (out - forward(model, inputs)).abs().max().item()
    return {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(model).items()}, out, effect


def _cast(inputs, dtype):
    if isinstance(inputs, dict):
        return {k: _cast(v, dtype) for k, v in inputs.items()}
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


def _adapted(lib, case, dtype):
    """The row's adapter in `lib` on a base in `dtype`, holding the reference adapter's values, eval mode."""
    config = config_class(case.method)(**copy.deepcopy(case.kwargs)) if lib is fastpeft else _hf_config(case)
    model = lib.get_peft_model(MODELS[case.model][0]().to(dtype), config)
    lib.set_peft_model_state_dict(model, _reference(case.id)[0])
    return model.eval()


def _file_dtypes(lib, model) -> dict:
    """dtype per adapter file key (in-memory names differ between the libraries for a few methods)."""
    return {k: v.dtype for k, v in lib.get_peft_model_state_dict(model).items()}


def _close(actual, expected, eps_units, dtype, what):
    atol = eps_units * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case, dtype", [pytest.param(c, d, id=f"{c.id}-{n}") for c in METHOD_CASES
                                         for n, d in DTYPES.items()])
def test_adapter_on_base_dtype(case, dtype):
    ours = _adapted(fastpeft, case, dtype)
    theirs = _adapted(peft, case, dtype) if case.hf_method else None  # fastpeft's own methods: HF has none
    if theirs is not None:
        assert _file_dtypes(fastpeft, ours) == _file_dtypes(peft, theirs)
    inputs = _cast(MODELS[case.model][1](), dtype)
    out = forward(ours, inputs)
    assert out.dtype == dtype
    # (Poly: HF PEFT's PeftModel cannot call the row's model; hf_half_base: see tests/cases.py)
    hf_checks = case.hf_method and case.hf_oracle and (case.hf_half_base or dtype == torch.float32)
    if hf_checks:
        expected = forward(theirs, inputs)
        assert expected.dtype == dtype
        _close(out, expected, HF_EPS, dtype, "HF PEFT's outputs")
    _, reference, effect = _reference(case.id)
    _close(out, reference, REF_EPS, dtype, "the float32 adapter's outputs")
    with ours.disable_adapter():
        assert (out - forward(ours, inputs)).abs().max().item() >= effect / 2, "the adapter does not act"
    _assert_gradients_reach_adapter(ours, inputs)
    if case.mergeable:
        _assert_merge_roundtrip(ours.eval(), theirs if hf_checks else None, inputs, out, dtype,
                                unmerge="unmerge" not in case.refused)


def _assert_gradients_reach_adapter(model, inputs) -> None:
    model.train()
    torch.manual_seed(0)
    result = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    (result if isinstance(result, torch.Tensor) else result.logits).float().pow(2).mean().backward()
    nonzero = False
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} got a gradient"
            continue
        assert param.grad is not None, f"no gradient on {name}"
        assert param.grad.dtype == param.dtype and param.grad.isfinite().all(), name
        nonzero = nonzero or bool(param.grad.abs().max() > 0)
    assert nonzero, "every adapter gradient is zero"


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}


def _assert_merged_like(merged: dict, expected: dict, dtype) -> None:
    assert sorted(merged) == sorted(expected)
    for name, weight in expected.items():
        assert merged[name].dtype == weight.dtype, name
        _close(merged[name], weight, MERGED_WEIGHT_EPS, dtype, f"HF PEFT's merged {name}")


def _assert_merge_roundtrip(ours, theirs, inputs, out, dtype, unmerge: bool = True) -> None:
    original = _base_weights(ours)
    ours.merge_adapter()
    merged = _base_weights(ours)
    if theirs is not None:  # HF PEFT's merged weights are the oracle
        theirs.merge_adapter()
        _assert_merged_like(merged, _base_weights(theirs), dtype)
    _close(forward(ours, inputs), out, MERGE_EPS, dtype, "merged outputs")
    if not unmerge:  # the row refuses unmerging (its "unmerge" column in tests/cases.py)
        return
    ours.unmerge_adapter()
    for name, weight in _base_weights(ours).items():
        # W + delta is rounded at the scale of the larger of the two: so is W after taking delta out again
        scale = max(merged[name].abs().max().item(), original[name].abs().max().item())
        atol = UNMERGE_EPS * torch.finfo(dtype).eps * scale
        torch.testing.assert_close(weight, original[name], atol=atol, rtol=0,
                                   msg=lambda m, n=name: f"unmerged {n}: {m}")


@functools.cache
def _prompt_state(method: str) -> dict:
    """The prompt encoder's tensors off their init (prefix projection files hold the encoder's output instead:
    the encoder's own state is what both libraries' encoders load)."""
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, "CAUSAL_LM"))
    perturb(model, scale=0.5)
    return {k: v.clone() for k, v in model.prompt_encoder.state_dict().items()}


@pytest.mark.parametrize("case, dtype", [pytest.param(c, d, id=f"{c.method}-{n}") for c in PROMPT_CASES
                                         for n, d in DTYPES.items()])
def test_prompt_method_on_base_dtype(case, dtype):
    """Soft prompts on a llama base in `dtype`: the prompt encoder stays float32 as in HF PEFT, the outputs
    have the base's dtype and HF PEFT's values, and gradients reach the encoder."""
    built = {}
    for lib in (fastpeft, peft):
        config = make_config(lib, case.method, "CAUSAL_LM")
        built[lib] = lib.get_peft_model(models.make_llama().to(dtype), config)
        built[lib].prompt_encoder.load_state_dict(_prompt_state(case.method))
    ours, theirs = built[fastpeft].eval(), built[peft].eval()
    assert _file_dtypes(fastpeft, ours) == _file_dtypes(peft, theirs)
    assert {p.dtype for p in ours.prompt_encoder.parameters()} == {torch.float32}
    inputs = models.llama_inputs()
    out = forward(ours, inputs)
    assert out.dtype == dtype
    _close(out, forward(theirs, inputs), HF_EPS, dtype, "HF PEFT's outputs")
    with ours.disable_adapter():
        real_tokens = out[:, -inputs["input_ids"].shape[1]:]
        assert not torch.equal(real_tokens, forward(ours, inputs)), "the prompt does not act"
    _assert_gradients_reach_adapter(ours, inputs)
