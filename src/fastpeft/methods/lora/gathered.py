"""Mixed-adapter batches for LoRA `Linear` layers as a few batched matmuls instead of a loop per adapter.

Each row's A and B are gathered from the live parameters on every call (no stacked copy is cached), so
optimizer steps, loads, hot-swaps that write through `.data`, and gradients all behave as in the loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# Fewer distinct adapters than this in a batch: the per-adapter loop (see benchmarks/README.md).
MIN_ADAPTERS = 4
_UNSEEN = object()


class Group(NamedTuple):
    """Rows of one rank and dtype, with the A (r, in), B (out, r) and scaling of each row's adapter."""

    rows: list[int]
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scaling: list[float]


def plan(layer, adapter_names: list[str]) -> list[Group] | None:
    """The batch's rows grouped by (rank, dtype) when the gathered path applies, else None (use the loop)."""
    if layer.merged or len(adapter_names) < MIN_ADAPTERS:
        return None
    factors: dict[str, tuple | None] = {}  # adapter -> (group key, A, B, scaling); None: not on this layer
    groups: dict[tuple, Group] = {}
    modules = layer.lora_A._modules, layer.lora_B._modules  # the ModuleDicts' own dicts: plain lookups
    for row, name in enumerate(adapter_names):
        item = factors.get(name, _UNSEEN)
        if item is _UNSEEN:
            item = factors[name] = _factors(layer, modules, name)
        if item is None:
            continue
        if item is False:
            return None
        key, a, b, scaling = item
        group = groups.get(key) or groups.setdefault(key, Group([], [], [], []))
        group.rows.append(row)
        group.a.append(a)
        group.b.append(b)
        group.scaling.append(scaling)
    used = sum(item is not None for item in factors.values())
    return list(groups.values()) if used >= MIN_ADAPTERS else None


def _factors(layer, modules: tuple[dict, dict], name: str):
    """(group key, A, B, scaling); None for "__base__" or an adapter this layer lacks; False where the
    loop's semantics are needed (a LoRA bias, or dropout that is active while training)."""
    a_mod = modules[0].get(name)
    if a_mod is None:
        return None
    b_mod = modules[1][name]
    if b_mod.bias is not None:
        return False
    if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
        return False
    a = a_mod.weight  # (r, in)
    return (a.shape[0], a.dtype), a, b_mod.weight, layer.scaling[name]


def mixed_forward(layer, x: torch.Tensor, groups: list[Group], adapter_names: list[str], *args, **kwargs):
    """base(x) plus, for row i, adapter `adapter_names[i]`'s LoRA output (rows of no adapter get nothing)."""
    layer.check_mixed_batch(x, adapter_names)
    result = layer.base_forward(x, *args, **kwargs)  # (batch, ..., out)
    out_dtype = result.dtype
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
    for group in groups:
        if len(group.rows) == x.shape[0]:  # the whole batch: no gather / scatter of activations
            delta = group_output(x3, group)  # (batch, tokens, out)
            result = result + delta.reshape(result.shape).to(result.dtype)
            continue
        idx = torch.tensor(group.rows, device=x.device)
        delta = group_output(x3.index_select(0, idx), group)  # (rows, tokens, out)
        result = result.index_add(0, idx, delta.reshape((len(idx),) + result.shape[1:]).to(result.dtype))
    return result.to(out_dtype)


def group_output(x: torch.Tensor, group: Group) -> torch.Tensor:
    """LoRA output of each row with its own adapter: x (rows, tokens, in) -> (rows, tokens, out)."""
    a = torch.stack(group.a)  # (rows, r, in)
    b = torch.stack(group.b)  # (rows, out, r)
    x = x.to(a.dtype)  # dropout is the identity here (eval mode or p == 0, see _factors)
    scale = torch.tensor(group.scaling, dtype=a.dtype, device=a.device).view(-1, 1, 1)  # (rows, 1, 1)
    hidden = torch.bmm(x, a.transpose(1, 2)) * scale  # (rows, tokens, r)
    return torch.bmm(hidden, b.transpose(1, 2))  # (rows, tokens, out)
