"""Stacked LoRA serving paths (methods/lora/stacked.py, gathered.py `_stacked_sum`): one-token rows (decode)
with B on the left of the batched matmul, sums formed in place only in tensors nobody else holds, and the
per-call signature seeing hooks, `forward` overrides and weight-less factor modules. Each equals the
per-adapter loop, also after optimizer steps and adapters added / deleted between calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

import fastpeft
from fastpeft.methods.lora import gathered, stacked

from many_lora import loop_logits as plain
from many_lora import randomize_lora as randomize
from many_lora import varied_lora_config, with_adapters
from models import MODELS, count_calls

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
N = 6
ONE_EACH = [f"a{i}" for i in range(N)]  # one row per adapter: k = 1
LAYOUTS = {
    "one_each": ONE_EACH,
    "one_each_reversed_with_base": ["__base__", *ONE_EACH[::-1]],
    "two_each": ONE_EACH + ONE_EACH[::-1],  # k = 2
    "uneven": ["a0", "a3", "__base__", "a1", "a5", "a2", "a0", "a4", "a0", "a3"],
}


def config(i: int):
    return varied_lora_config(fastpeft, i, TARGETS)


def build(n: int = N):
    return with_adapters(fastpeft, MODELS["llama"][0], TARGETS, n)


def ids(rows: int, tokens: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (rows, tokens), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def stacked_calls(monkeypatch):
    return count_calls(monkeypatch, stacked, "stacked_output")


def check(model, counter, names, tokens: int = 1, stacked_ran: bool = True) -> torch.Tensor:
    inputs = ids(len(names), tokens)
    before = counter["n"]
    with torch.inference_mode():
        got = model(input_ids=inputs, adapter_names=names).logits.clone()
    assert (counter["n"] > before) == stacked_ran
    torch.testing.assert_close(got, plain(model, inputs, names), atol=1e-5, rtol=0)
    return got


def v_proj(model, layer: int = 0):
    return model.base_model.model.model.layers[layer].self_attn.v_proj


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 3])
def test_rows_equal_the_loop(layout, tokens, stacked_calls):
    model = build()
    out = check(model, stacked_calls, LAYOUTS[layout], tokens)
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids(len(LAYOUTS[layout]), tokens)).logits
    assert (out - base).abs().max() > 0.1


def test_one_token_rows_after_training_and_adapter_changes(stacked_calls):
    model = build()
    before = check(model, stacked_calls, ONE_EACH)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):
        model.train()
        model(input_ids=ids(len(ONE_EACH), 4), adapter_names=ONE_EACH).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        after = check(model.eval(), stacked_calls, ONE_EACH)
        assert (after - before).abs().max() > 1e-3
        before = after
    model.delete_adapter("a2")
    model.add_adapter("z", config(4))
    randomize(model, seed=7, only="z")
    names = [n if n != "a2" else "z" for n in ONE_EACH]
    check(model.eval(), stacked_calls, names)
    check(model, stacked_calls, names[::-1] + ["__base__"])


def _keep_outputs(kept: list):
    def hook(module, args, output):
        if isinstance(module, nn.Linear) and output.dim() == 3:
            kept.append((output, output.clone()))
    return hook


@pytest.mark.parametrize("where", ["base_layer", "global"])
def test_kept_base_output_is_not_written(where, stacked_calls):
    """A forward hook that keeps the base layer's output (on the base layer, or a global one) sees the base
    output unchanged: the LoRA sums go into a copy."""
    model = build()
    check(model, stacked_calls, ONE_EACH)
    kept: list = []
    if where == "global":
        handle = module_mod.register_module_forward_hook(_keep_outputs(kept))
    else:
        handle = v_proj(model).get_base_layer().register_forward_hook(_keep_outputs(kept))
    try:
        check(model, stacked_calls, ONE_EACH, tokens=2)
    finally:
        handle.remove()
    assert kept and all(torch.equal(out, copy) for out, copy in kept)


def test_base_output_written_in_place_when_unhooked(stacked_calls, monkeypatch):
    """Without hooks the base output is the sum's target: no copy of (batch, tokens, out) per group."""
    model = build()
    seen = []
    original = gathered._owned_output
    monkeypatch.setattr(gathered, "_owned_output", lambda *a: seen.append(original(*a)) or seen[-1])
    check(model, stacked_calls, LAYOUTS["uneven"])
    assert seen and all(seen)


def _doubled(module: nn.Module):
    cls_forward = type(module).forward
    return lambda x: 2 * cls_forward(module, x)


@pytest.mark.parametrize("change", ["forward_override", "pre_hook", "hook"])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_factor_module_changes_are_seen(change, which, stacked_calls):
    """A factor module given a `forward` of its own or a hook after the stacks were built: that layer takes
    the plain gathered path (which calls the modules); once removed, the stacks serve it again."""
    model = build()
    before = check(model, stacked_calls, ONE_EACH)
    mod = getattr(v_proj(model), which)["a1"]
    if change == "forward_override":
        mod.forward = _doubled(mod)
    elif change == "pre_hook":
        handle = mod.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        handle = mod.register_forward_hook(lambda m, args, out: out * 2)
    changed = check(model, stacked_calls, ONE_EACH)
    assert (changed[1] - before[1]).abs().max() > 1e-3
    if change == "forward_override":
        del mod.forward
    else:
        handle.remove()
    torch.testing.assert_close(check(model, stacked_calls, ONE_EACH), before, atol=1e-6, rtol=0)
    assert v_proj(model).__dict__["_lora_stacks"].where.get("a1") is not None  # stacked again


class BufferWeight(nn.Module):
    """A factor whose weight is a buffer, not a parameter: not a plain LoRA layer, never stacked."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.bias = None

    def forward(self, x):
        return x @ self.weight.T


def test_factor_without_weight_parameter(stacked_calls):
    model = build()
    check(model, stacked_calls, ONE_EACH)
    layer = v_proj(model)
    layer.lora_B["a3"] = BufferWeight(layer.lora_B["a3"].weight * 3)
    out = check(model, stacked_calls, ONE_EACH)  # the other layers still use their stacks
    assert "_lora_stacks" in layer.__dict__ and stacked.layer_cache(layer) is None
    assert out.isfinite().all()
