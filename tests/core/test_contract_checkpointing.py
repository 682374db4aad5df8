"""Activation checkpointing as a column of the contract matrix: for every row of METHOD_CASES, a training
step with the base model's checkpointing on gives the loss and the adapter gradients of the same step without
it, recomputes the adapter layers in backward, and leaves the base frozen (no gradient, requires_grad as
it was).

transformers rows use the model's own activation checkpointing, reentrant, switched on after wrapping (for
models whose main input is input_ids, transformers itself makes the embeddings' output require grad). The
plain torch rows run the whole base forward under non-reentrant `torch.utils.checkpoint`, so every adapter
layer is recomputed in backward, after the wrapped call has returned (and with it any per-call state a layer
reads). Both steps draw dropout masks from the same seed; checkpointing replays the RNG state. Rows whose
method refuses checkpointed training, or has a known bug there, say so in tests/cases.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastpeft
from fastpeft.core.layer import AdapterHolder

import models
from cases import METHOD_CASES, PROMPT_CASES, build
from prompt_helpers import _labelled, make_config
from prompt_helpers import perturb as prompt_perturb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only spins

TRANSFORMERS_MODELS = {"llama", "gpt2", "t5", "bert_cls"}


def _enable_checkpointing(model, model_name: str) -> None:
    base = model.get_base_model()
    if model_name in TRANSFORMERS_MODELS:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        return
    inner = base.forward
    base.forward = lambda *args, **kwargs: checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _count_adapter_calls(model) -> list[int]:
    """A counter of adapter-layer calls (pre-hooks: a recompute may stop inside a layer once it has what
    backward needs)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    for module in model.modules():
        if isinstance(module, AdapterHolder):
            module.register_forward_pre_hook(count)
    return calls


def _step(model, inputs):
    """Loss and gradients of one training step, dropout drawn from seed 0; gradients are reset afterwards."""
    model.train()
    torch.manual_seed(0)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    loss = out.loss if getattr(out, "loss", None) is not None else (
        out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen parameters got gradients: {frozen}"
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _params(cases, ids):
    for case, case_id in zip(cases, ids):
        bug = case.known_bugs.get("checkpointing")
        marks = [pytest.mark.xfail(strict=True, reason=bug.reason, raises=bug.raises)] if bug else []
        yield pytest.param(case, id=case_id, marks=marks)


def _assert_same_step(model, inputs, want_loss, want) -> None:
    loss, grads = _step(model, inputs)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert sorted(grads) == sorted(want)
    assert any(g is not None and g.abs().max() > 0 for g in want.values()), "the plain step has no gradient"
    for name, grad in want.items():
        assert grads[name] is not None, f"no gradient on {name} under checkpointing"
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("case", list(_params(METHOD_CASES, [c.id for c in METHOD_CASES])))
def test_checkpointed_step_equals_plain_step(case):
    model, inputs = build(case, seed_adapter=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    calls = _count_adapter_calls(model)
    want_loss, want = _step(model, inputs)
    plain_calls = calls[0]
    if case.method == "AdaLoraConfig":  # refuses a second step without rank allocation: a fresh copy takes it
        model, _ = build(case, seed_adapter=True)
        calls = _count_adapter_calls(model)
    _enable_checkpointing(model, case.model)
    if "checkpointing" in case.refused:  # the method refuses it: with an error that says so
        with pytest.raises(NotImplementedError, match="checkpointing"):
            _step(model, inputs)
        return
    before = calls[0]
    _assert_same_step(model, inputs, want_loss, want)
    assert calls[0] - before > plain_calls, "no adapter layer was recomputed in backward"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("case", list(_params(PROMPT_CASES, [c.method for c in PROMPT_CASES])))
def test_prompt_method_checkpointed_step_equals_plain_step(case):
    """Soft prompts on llama: the prompt encoder runs outside the checkpointed layers, its output enters
    them."""
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, case.method, "CAUSAL_LM"))
    prompt_perturb(model, 3)
    inputs = _labelled("llama", models.llama_inputs())
    want_loss, want = _step(model, inputs)
    _enable_checkpointing(model, "llama")
    if "checkpointing" in case.refused:
        with pytest.raises(ValueError, match="checkpointing"):
            _step(model, inputs)
        return
    _assert_same_step(model, inputs, want_loss, want)
