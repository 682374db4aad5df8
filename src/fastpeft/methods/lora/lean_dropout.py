"""Memory-lean dropout for the LoRA branch: `s * B A dropout(x)` without keeping `dropout(x)` for backward.

Through plain autograd, `lora_B(lora_A(nn.Dropout(p)(x)))` keeps the dropped copy of the input (and the mask)
alive until backward, for every adapted layer (Hu et al., 2021 put LoRA with dropout on every projection, so
this adds up), although the base layer's matmul already keeps `x` itself. Here the branch is one autograd
node that keeps `x`, the rank-r activation `A dropout(x)` and the mask in the cheapest exact form:

- `LeanDropoutLinear` (the usual case): backward written out with the same matmul layouts as autograd's linear
  backward; the mask is kept as one byte per element (`MASK_STORAGE = "bool"`), or not at all
  (`"regenerate"`: the generator state is kept and the mask redrawn in backward, at the price of a second
  Bernoulli draw, as in activation checkpointing, Chen et al., 2016);
- `LeanDropoutBranch` (under autocast, or half precision on accelerators): keeps the generator state, redraws
  the mask and replays the branch under autograd with the forward's autocast state.

Both draw the mask through `F.dropout` from the same generator state as `nn.Dropout` would, so masks,
outputs and gradients equal plain autograd's bit for bit and the generator ends where it would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that dropout on `device` draws from."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def _forked_devices(device: torch.device) -> list:
    return [] if device.type == "cpu" else [device]


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    kind = device.type
    return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class LeanDropoutBranch(torch.autograd.Function):
    """out = branch(dropout(x, p)); saves x and the generator state, not dropout(x) nor the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, branch: Callable[[torch.Tensor], torch.Tensor],
                *params: torch.Tensor) -> torch.Tensor:
        ctx.p, ctx.branch, ctx.device, ctx.params = p, branch, x.device, params
        ctx.rng = _rng_state(x.device)
        ctx.autocast = _autocast_state(x.device)
        ctx.save_for_backward(x)
        return branch(F.dropout(x, p, training=True))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need and i not in (1, 2)]
        with torch.random.fork_rng(devices=_forked_devices(ctx.device)), torch.enable_grad():
            _set_rng_state(ctx.device, ctx.rng)
            leaf = x.detach().requires_grad_(ctx.needs_input_grad[0])
            enabled, dtype = ctx.autocast
            with torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.branch(F.dropout(leaf, ctx.p, training=True))
        params = ctx.params
        inputs = [leaf if i == 0 else params[i - 3] for i in wanted]
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True) if inputs else ()
        result: list = [None] * (3 + len(params))
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)


# How LeanDropoutLinear keeps the mask: "bool" stores it at one byte per element (plain autograd keeps the
# dropped input and the float mask: 8 bytes per float32 element); "regenerate" stores only the generator state
# and redraws the mask in backward (no bytes at all, but a second Bernoulli draw, which is slow on CPU).
MASK_STORAGE = "bool"


def _keep_mask(ctx, x: torch.Tensor, p: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(dropout(x) as nn.Dropout draws it, the tensors `_mask_scale` needs to rebuild the mask)."""
    ctx.rng = _rng_state(x.device) if MASK_STORAGE == "regenerate" else None
    scale = dropout_scale(x, p)  # the same draws as F.dropout(x): 0 or 1 / (1 - p)
    kept = () if ctx.rng is not None else (scale.bool(), kept_value(scale, p))
    return x * scale, kept  # x * scale: what F.dropout(x) returns, bit for bit


def dropout_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """The tensor F.dropout(x, p) multiplies x by. On CPU drawn as ATen's dropout does there (Bernoulli(1 - p)
    draws into an empty tensor, divided by 1 - p in place): the same generator calls and values, without the
    tensor of ones and the product with it; elsewhere (fused kernels) through F.dropout itself."""
    if x.device.type == "cpu":
        return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return F.dropout(torch.ones_like(x), p, training=True)


def kept_value(scale: torch.Tensor, p: float) -> torch.Tensor:
    """1 / (1 - p) rounded as the dropout kernel rounds it in the mask's dtype: on CPU the same division on a
    small tensor (no pass over the mask), elsewhere the largest mask value."""
    if scale.device.type == "cpu":
        return torch.ones(64, dtype=scale.dtype).div_(1 - p)[0].clone()  # own 0-dim storage
    return scale.amax() if scale.numel() else scale.new_zeros(())


def _mask_scale(ctx, x: torch.Tensor, kept: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The tensor of 0 and 1 / (1 - p) that forward multiplied x by."""
    if ctx.rng is None:
        mask, scale = kept
        return torch.where(mask, scale.to(x.dtype), 0.0)  # one pass
    with torch.random.fork_rng(devices=_forked_devices(ctx.device)):
        _set_rng_state(ctx.device, ctx.rng)
        return F.dropout(torch.ones_like(x), ctx.p, training=True)


class LeanDropoutLinear(torch.autograd.Function):
    """out = s * F.linear(F.linear(dropout(x, p), A), B, bias) with the gradients written out (no replay).

    Saves x, h = A dropout(x) (rank-r wide, kept by plain autograd too) and the mask as MASK_STORAGE says, not
    dropout(x). Backward forms the same products, in the same layouts, as autograd's linear/matmul backward,
    so the gradients match plain autograd bit for bit (tests/methods/test_lean_dropout.py checks it).
    """

    @staticmethod
    def forward(ctx, x, p, scaling, a_w, b_w, b_bias):
        ctx.p, ctx.scaling, ctx.device = p, scaling, x.device
        dropped, kept = _keep_mask(ctx, x, p)
        h = F.linear(dropped, a_w)
        ctx.save_for_backward(x, h, a_w, b_w, *kept)
        return F.linear(h, b_w, b_bias) * scaling

    @staticmethod
    def backward(ctx, grad_out):
        x, h, a_w, b_w, *kept = ctx.saved_tensors
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad
        scale = _mask_scale(ctx, x, kept)
        g = (grad_out * ctx.scaling).reshape(-1, grad_out.shape[-1])
        grad_b = g.t().mm(h.reshape(-1, h.shape[-1])) if need_b else None
        grad_bias = g.sum(0) if need_bias else None
        g_h = g.mm(b_w)
        grad_a = g_h.t().mm((x * scale).reshape(-1, x.shape[-1])) if need_a else None
        grad_x = g_h.mm(a_w).reshape(x.shape) * scale if need_x else None
        return grad_x, None, None, grad_a, grad_b, grad_bias


def _branch(a: nn.Linear, b: nn.Linear, scaling: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda dropped: b(a(dropped)) * scaling


def _fast_path_exact(x: torch.Tensor) -> bool:
    """Written-out backward: no autocast (its casts live in the replay) and a mask scale that is exact in x's
    dtype on accelerators, whose fused dropout scales in float32 (half-precision there replays)."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    return x.device.type == "cpu" or x.dtype in (torch.float32, torch.float64)


def lean_lora_output(x: torch.Tensor, dropout: nn.Dropout, a: nn.Linear, b: nn.Linear,
                     scaling: float) -> torch.Tensor:
    """s * b(a(dropout(x))) for `x` already in `a`'s dtype, keeping only `x` and the RNG state for
    backward."""
    if _fast_path_exact(x):
        return LeanDropoutLinear.apply(x, dropout.p, scaling, a.weight, b.weight, b.bias)
    params = tuple(t for t in (a.weight, b.weight, b.bias) if t is not None)
    return LeanDropoutBranch.apply(x, dropout.p, _branch(a, b, scaling), *params)


def lean_applies(dropout: nn.Module) -> bool:
    """Whether the lean path would change anything: active dropout (training, p > 0) with autograd
    recording."""
    return (type(dropout) is nn.Dropout and dropout.training and 0 < dropout.p < 1 and torch.is_grad_enabled()
            and not dropout.inplace)
