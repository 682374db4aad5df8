"""LoRA Linear without autograd (no_grad / inference_mode / nothing requiring grad): the output is formed in
place in tensors the forward made (methods/lora/inplace.py). It must equal the recording path and HF PEFT bit
for bit (fp32, bf16 base with fp32 adapters, several active adapters, eval dropout, GPT-2 Conv1D, scalings
that are / are not powers of two), never write into the caller's input, the base weights or a base output
that someone else holds, and leave training forwards recording gradients as before.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.lora import inplace

import models

TOKENS, D_IN, D_OUT = 37, 48, 80


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.Linear(D_IN, D_OUT).to(dtype)
        self.down = nn.Linear(D_OUT, D_IN, bias=False).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


def _pair(base, adapters, **cfg):
    """fastpeft and HF PEFT models on the same base weights with the same (non-zero) adapter weights."""
    fast_cfg = {"target_modules": ["up", "down"], "r": 4, "lora_alpha": 8, **cfg}
    fast = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**fast_cfg),
                                   adapter_name=adapters[0])
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fast_cfg), adapter_name=adapters[0])
    for name in adapters[1:]:
        fast.add_adapter(name, fastpeft.LoraConfig(**{**fast_cfg, "lora_alpha": 12}))
        hf.add_adapter(name, peft.LoraConfig(**{**fast_cfg, "lora_alpha": 12}))
    _perturb(fast)
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in fast.named_parameters():
            hf_params[n].copy_(p)
    for m in (fast, hf):
        m.base_model.set_adapter(list(adapters))
        m.eval()
    return fast, hf


def _x(dtype=torch.float32, shape=(TOKENS, D_IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(dtype)


def _spy(monkeypatch):
    calls = []
    real = inplace.add_adapters
    monkeypatch.setattr(inplace, "add_adapters", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=8),  # s = 2: folded into A's output
    dict(r=4, lora_alpha=7),  # s = 1.75: multiplied after B
    dict(r=4, lora_alpha=4),  # s = 1
    dict(r=4, lora_alpha=2, lora_bias=True),  # s = 0.5 with B bias: not foldable
    dict(r=4, lora_alpha=8, use_rslora=True),  # s = 4
], ids=["s2", "s1.75", "s1", "bias", "rslora"])
@pytest.mark.parametrize("adapters", [("a",), ("a", "b")], ids=["one", "two"])
def test_no_grad_equals_grad_path_and_hf(dtype, cfg, adapters, monkeypatch):
    fast, hf = _pair(Net(dtype), adapters, lora_dropout=0.1, **cfg)
    x = _x(dtype)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        fast_out, hf_out = fast(x), hf(x)
    assert len(calls) == 2, "the no-grad forward must take the in-place path"
    recorded = fast(x)  # adapters require grad: the plain path
    assert recorded.requires_grad and len(calls) == 2
    assert fast_out.dtype == dtype
    assert torch.equal(fast_out, recorded.detach())
    assert torch.equal(fast_out, hf_out)
    with fast.disable_adapter(), torch.no_grad():
        base_out = fast(x)
    assert (fast_out - base_out).abs().max() > 0.05  # the adapters matter


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_contexts_and_callers_tensors_untouched(ctx, monkeypatch):
    fast, _ = _pair(Net(torch.bfloat16), ("a", "b"))
    x = _x(torch.bfloat16)
    x_before = x.clone()
    weights_before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    expected = fast(x).detach()
    calls = _spy(monkeypatch)
    with ctx():
        out = fast(x)
    assert calls and torch.equal(out, expected)
    assert torch.equal(x, x_before)
    for n, p in fast.named_parameters():
        assert torch.equal(p, weights_before[n]), n


def test_requires_grad_false_everywhere_takes_in_place_path(monkeypatch):
    fast, _ = _pair(Net(), ("a",))
    x = _x()
    expected = fast(x).detach()
    for p in fast.parameters():
        p.requires_grad_(False)
    calls = _spy(monkeypatch)
    out = fast(x)  # grad mode on, nothing to record
    assert calls and torch.equal(out, expected)


def test_hooked_base_output_not_written():
    """A forward hook keeping the base layer's output (activation capture) must see the base output."""
    fast, _ = _pair(Net(), ("a",))
    base = fast.base_model.model.up.base_layer
    kept = []
    base.register_forward_hook(lambda m, i, o: kept.append(o))
    x = _x()
    with torch.no_grad():
        fast(x)
        assert torch.equal(kept[0], nn.functional.linear(x, base.weight, base.bias))


class CachedLinear(nn.Linear):
    """A base layer that hands out the same output tensor on every call (e.g. a cache)."""

    def forward(self, x):
        if not hasattr(self, "cache"):
            self.cache = super().forward(x)
        return self.cache


def test_shared_base_output_not_written():
    net = Net()
    cached = CachedLinear(D_IN, D_OUT)
    cached.load_state_dict(net.up.state_dict())
    net.up = cached
    fast, _ = _pair(net, ("a",))
    cached = fast.base_model.model.up.base_layer
    x = _x()
    with torch.no_grad():
        first = fast(x).clone()
        second = fast(x)
    assert torch.equal(first, second)
    assert torch.equal(cached.cache, nn.functional.linear(x, cached.weight, cached.bias))


def test_conv1d_gpt2_bit_identical(monkeypatch):
    base = models.make_conv1d_gpt2()
    cfg = dict(target_modules=["c_fc", "c_proj"], r=4, lora_alpha=8, fan_in_fan_out=True)
    fast = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    _perturb(fast)
    hf.load_state_dict(fast.state_dict())
    fast.eval(), hf.eval()
    x = models.conv1d_gpt2_inputs()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        out, hf_out = fast(x), hf(x)
    assert len(calls) == 2
    assert torch.equal(out, fast(x).detach()) and torch.equal(out, hf_out)
    assert torch.equal(x, models.conv1d_gpt2_inputs())


def test_training_forward_records_gradients_like_hf(monkeypatch):
    fast, hf = _pair(Net(), ("a",), lora_dropout=0.0)
    fast.train(), hf.train()
    x = _x()
    calls = _spy(monkeypatch)
    for m in (fast, hf):
        m(x).square().mean().backward()
    assert not calls
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.equal(p.grad, hf_grads[n]), n
    # a step, then inference again: still equal to the recording path
    with torch.no_grad():
        for p in fast.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
        out = fast.eval()(x)
    assert torch.equal(out, fast(x).detach())


def test_input_gradient_with_frozen_adapters_like_hf(monkeypatch):
    """Frozen adapters but an input that requires grad (e.g. a trained layer below): the recording path."""
    fast, hf = _pair(Net(), ("a",))
    for m in (fast, hf):
        for p in m.parameters():
            p.requires_grad_(False)
    calls = _spy(monkeypatch)
    grads = []
    for m in (fast, hf):
        x = _x().requires_grad_(True)
        m(x).square().mean().backward()
        grads.append(x.grad)
    assert not calls
    assert torch.equal(grads[0], grads[1])
