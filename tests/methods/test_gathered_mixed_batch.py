"""Gathered mixed-adapter batches (methods/lora/gathered.py): same outputs and gradients as the per-adapter
loop and HF PEFT, the rule choosing between them, and fresh results after every kind of weight change."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.lora import gathered

from many_lora import randomize_lora as randomize
from many_lora import varied_lora_config, with_adapters
from models import MODELS, count_calls, forward

TARGETS = {"mlp": (["lin0", "lin1"], "x"),
           "llama": (["q_proj", "v_proj", "o_proj", "down_proj"], "input_ids"),
           "conv1d_gpt2": (["c_fc", "c_proj"], "x")}
N_ADAPTERS = 6
# 6 adapters + base rows
NAMES = ["a0", "a3", "__base__", "a1", "a5", "a2", "a0", "a4", "__base__", "a5", "a3"]


def lora_config(lib, model_name: str, i: int, **extra):
    return varied_lora_config(lib, i, TARGETS[model_name][0], **extra)


def build(lib, model_name: str, n: int = N_ADAPTERS, **extra):
    return with_adapters(lib, MODELS[model_name][0], TARGETS[model_name][0], n, **extra)


def batch(model_name: str, size: int = len(NAMES)) -> dict:
    inputs = MODELS[model_name][1]()
    tensor = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    return {TARGETS[model_name][1]: tensor.repeat(size, *([1] * (tensor.dim() - 1)))[:size]}


@pytest.fixture
def calls(monkeypatch):
    """Counts gathered group computations, so a test can tell which path ran."""
    return count_calls(monkeypatch, gathered, "group_output")


def loop_forward(model, inputs, names=NAMES) -> torch.Tensor:
    saved, gathered.MIN_ADAPTERS = gathered.MIN_ADAPTERS, 10**9
    try:
        return forward(model, {**inputs, "adapter_names": names})
    finally:
        gathered.MIN_ADAPTERS = saved


def assert_gathered_equals_loop(model, inputs, calls) -> torch.Tensor:
    before = calls["n"]
    out = forward(model, {**inputs, "adapter_names": NAMES})
    assert calls["n"] > before, "the gathered path did not run"
    torch.testing.assert_close(out, loop_forward(model, inputs), atol=1e-5, rtol=0)
    return out


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_gathered_equals_loop_and_hf(model_name, calls):
    ours, theirs = build(fastpeft, model_name), build(peft, model_name)
    inputs = batch(model_name)
    out = assert_gathered_equals_loop(ours, inputs, calls)
    torch.testing.assert_close(out, forward(theirs, {**inputs, "adapter_names": NAMES}), atol=1e-5, rtol=0)
    with ours.disable_adapter():
        plain = forward(ours, inputs)
    base_rows = [i for i, n in enumerate(NAMES) if n == "__base__"]
    torch.testing.assert_close(out[base_rows], plain[base_rows], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


def test_rule_picks_loop_for_few_adapters(calls):
    model = build(fastpeft, "mlp")
    layer = model.base_model.model.lin0
    few = ["a0", "a1", "__base__", "a2", "a0"]
    assert gathered.plan(layer, few) is None
    assert gathered.plan(layer, few + ["a3"]) is not None
    forward(model, {**batch("mlp", len(few)), "adapter_names": few})
    assert calls["n"] == 0


def test_falls_back_for_lora_bias_and_training_dropout(calls):
    model = build(fastpeft, "mlp", lora_bias=True)
    assert gathered.plan(model.base_model.model.lin0, NAMES) is None
    model = build(fastpeft, "mlp", lora_dropout=0.1).train()
    assert gathered.plan(model.base_model.model.lin0, NAMES) is None
    assert gathered.plan(model.eval().base_model.model.lin0, NAMES) is not None


def test_batch_length_mismatch_is_refused():
    model = build(fastpeft, "mlp")
    with pytest.raises(ValueError, match="adapter_names has"):
        forward(model, {**batch("mlp", len(NAMES) - 1), "adapter_names": NAMES})


def lora_grads(model, inputs, gather: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    saved, gathered.MIN_ADAPTERS = gathered.MIN_ADAPTERS, 1 if gather else 10**9
    try:
        out = model(**inputs, adapter_names=NAMES)
    finally:
        gathered.MIN_ADAPTERS = saved
    logits = out if isinstance(out, torch.Tensor) else out.logits
    (logits ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
def test_gradients_equal_the_loop(model_name, calls):
    model = build(fastpeft, model_name).train()
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    inputs = batch(model_name)
    looped = lora_grads(model, inputs, gather=False)
    assert calls["n"] == 0
    grads = lora_grads(model, inputs, gather=True)
    assert calls["n"] > 0
    assert sorted(grads) == sorted(looped) and any("a5" in n for n in grads)
    for name in looped:
        torch.testing.assert_close(grads[name], looped[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fresh_after_optimizer_step(calls):
    model = build(fastpeft, "llama")
    inputs = batch("llama")
    before = assert_gathered_equals_loop(model, inputs, calls)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    model(**inputs, adapter_names=NAMES).logits.pow(2).mean().backward()
    opt.step()
    after = assert_gathered_equals_loop(model, inputs, calls)
    assert not torch.allclose(before, after, atol=1e-4)


def test_fresh_after_load_adapter_into_existing_name(calls, adapter_dir):
    model, donor = build(fastpeft, "llama"), build(fastpeft, "llama")
    randomize(donor, seed=7, only="a3")
    donor.save_pretrained(adapter_dir, selected_adapters=["a3"])
    inputs = batch("llama")
    before = assert_gathered_equals_loop(model, inputs, calls)
    model.load_adapter(adapter_dir / "a3", adapter_name="a3")
    after = assert_gathered_equals_loop(model, inputs, calls)
    torch.testing.assert_close(after, forward(donor, {**inputs, "adapter_names": NAMES}), atol=1e-5, rtol=0)
    rows = [i for i, n in enumerate(NAMES) if n == "a3"]
    assert not torch.allclose(before[rows], after[rows], atol=1e-4)


@pytest.mark.parametrize("edit", ["no_grad_copy", "data_copy", "data_assign", "scaling"])
def test_fresh_after_direct_weight_edits(edit, calls):
    """In-place writes (also through `.data`, as hot-swapping does), new storage, and a new scaling."""
    model = build(fastpeft, "mlp")
    inputs = batch("mlp")
    before = assert_gathered_equals_loop(model, inputs, calls)
    layer = model.base_model.model.lin1
    weight = layer.lora_B["a2"].weight
    new = torch.randn(weight.shape)
    if edit == "no_grad_copy":
        with torch.no_grad():
            weight.copy_(new)
    elif edit == "data_copy":
        weight.data.copy_(new)
    elif edit == "data_assign":
        weight.data = new
    else:
        layer.scaling["a2"] *= 3.0
    after = assert_gathered_equals_loop(model, inputs, calls)
    assert not torch.allclose(before, after, atol=1e-4)


def test_fresh_after_delete_and_add_adapter(calls):
    model = build(fastpeft, "llama")
    inputs = batch("llama")
    before = assert_gathered_equals_loop(model, inputs, calls)
    model.delete_adapter("a4")
    model.add_adapter("a4", lora_config(fastpeft, "llama", 5))  # another rank and alpha
    randomize(model, seed=3, only="a4")
    after = assert_gathered_equals_loop(model.eval(), inputs, calls)
    theirs = build(peft, "llama")
    theirs.delete_adapter("a4")
    theirs.add_adapter("a4", lora_config(peft, "llama", 5))
    randomize(theirs, seed=3, only="a4")
    torch.testing.assert_close(after, forward(theirs.eval(), {**inputs, "adapter_names": NAMES}),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(before, after, atol=1e-4)


def test_set_adapter_does_not_change_mixed_batches(calls):
    model = build(fastpeft, "mlp")
    inputs = batch("mlp")
    before = assert_gathered_equals_loop(model, inputs, calls)
    model.set_adapter("a4")
    torch.testing.assert_close(assert_gathered_equals_loop(model, inputs, calls), before, atol=1e-6, rtol=0)
