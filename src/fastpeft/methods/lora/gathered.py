"""Mixed-adapter batches for LoRA `Linear` layers as a few batched matmuls instead of a loop per adapter.

Without autograd (serving), the factors come from stacks kept across calls that are the parameters' own
storage (`stacked.py`: in-place writes, also through `.data`, land in them; anything else is seen by a
signature check). With autograd, each row's A and B are gathered from the live parameters on every call, so
gradients reach them as in the loop. The rows are grouped by adapter once per call (`stacked.row_plan`).

Long rows with few adapters (prefill): each adapter's rows go through one matmul with its merged weight
`W + s B A` (built per call, `merged_plan` / `merged_forward`), instead of the base matmul plus the two LoRA
matmuls, the gather of the rows' inputs and the scatter-add of their outputs. Worth it when an adapter's rows
hold more tokens than the merged weight costs to build (about in * out / (in + out) per rank unit).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_mod

from ...core.device_index import index_tensor
from . import stacked

# Fewer distinct adapters than this in a batch: the per-adapter loop (see benchmarks/README.md).
MIN_ADAPTERS = 4
# Merged weights when every adapter's rows hold >= MERGE_FROM * in * out / (in + out) tokens
# (benchmarks/README.md).
MERGE_FROM = 1.0


class Group(NamedTuple):
    """Rows of one rank and dtype, with the A (r, in), B (out, r) and scaling of each row's adapter."""

    rows: list[int]
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scaling: list[float]


def plan(layer, adapter_names: list[str]) -> list | None:
    """The batch's rows grouped by (rank, dtype) when the gathered path applies, else None (use the loop):
    `stacked.StackedGroup`s (factors stacked across calls) where no gradient is needed, else `Group`s."""
    # group_output casts
    if layer.merged or len(adapter_names) < MIN_ADAPTERS or not layer.cast_input_dtype_enabled:
        return None
    rows = stacked.row_plan(adapter_names)  # once per call for all layers
    if stacked.usable(layer):
        found = stacked.stacked_plan(layer, rows, MIN_ADAPTERS)
        if found is not False:
            return found
    groups: dict[tuple, Group] = {}
    view = _layer_view(layer)
    used = 0
    for name, name_rows in zip(rows.names, rows.rows):
        item = _factors(view, name)
        if item is None:
            continue
        if item is False:
            return None
        used += 1
        key, a, b, scaling = item
        group = groups.get(key) or groups.setdefault(key, Group([], [], [], []))
        group.rows.extend(name_rows)
        group.a.extend([a] * len(name_rows))
        group.b.extend([b] * len(name_rows))
        group.scaling.extend([scaling] * len(name_rows))
    return list(groups.values()) if used >= MIN_ADAPTERS else None


def _layer_view(layer) -> tuple:
    """What `_factors` reads, looked up once per call: the ModuleDicts' own dicts (plain lookups), the dropout
    modules only while training (in eval mode dropout is the identity), and the scaling dict."""
    dropouts = layer.lora_dropout._modules if layer.training else None
    return layer.lora_A._modules, layer.lora_B._modules, dropouts, layer.scaling


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module._parameters.get("weight")  # skips nn.Module.__getattr__ (called ~100 times per layer)
    return module.weight if weight is None else weight


def _factors(view: tuple, name: str):
    """(group key, A, B, scaling); None for "__base__" or an adapter this layer lacks; False where the
    loop's semantics are needed (a LoRA bias, dropout that is active while training, hooked / offloaded
    factors)."""
    a_modules, b_modules, dropouts, scaling = view
    a_mod = a_modules.get(name)
    if a_mod is None:
        return None
    b_mod = b_modules[name]
    if b_mod.bias is not None:
        return False
    if dropouts is not None and not isinstance(dropouts[name], nn.Identity):
        return False
    a, b = _weight(a_mod), _weight(b_mod)  # (r, in), (out, r)
    if not (_runs_as_is(a_mod, a) and _runs_as_is(b_mod, b)):
        return False
    return (a.shape[0], a.dtype), a, b, scaling[name]


def _runs_as_is(module: nn.Module, weight: torch.Tensor) -> bool:
    """Whether reading `module`'s weight directly is what calling it would use: no accelerate hook swapping
    the weight in on call (offloading leaves it on the meta device), no forward hooks of the user skipped."""
    return (not weight.is_meta and "forward" not in module.__dict__ and not module._forward_pre_hooks
            and not module._forward_hooks)


def mixed_forward(layer, x: torch.Tensor, groups: list, adapter_names: list[str], *args, **kwargs):
    """base(x) plus, for row i, adapter `adapter_names[i]`'s LoRA output (rows of no adapter get nothing)."""
    layer.check_mixed_batch(x, adapter_names)
    result = layer.base_forward(x, *args, **kwargs)  # (batch, ..., out)
    out_dtype = result.dtype
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
    if isinstance(groups[0], stacked.StackedGroup):
        return _stacked_sum(layer, x, x3, result, groups)
    # the rows and scalings of all groups in one tensor each (list -> tensor conversions are slow), sliced
    # below
    rows = index_tensor([row for group in groups for row in group.rows], x.device)
    scales = index_tensor([s for group in groups for s in group.scaling], x.device, torch.float64)
    start = 0
    for group in groups:
        end = start + len(group.rows)
        scale = scales[start:end]
        if len(group.rows) == x.shape[0]:  # the whole batch: no gather / scatter of activations
            delta = group_output(x3, group, scale)  # (batch, tokens, out)
            result = result + delta.reshape(result.shape).to(result.dtype)
        else:
            idx = rows[start:end]
            delta = group_output(x3.index_select(0, idx), group, scale)  # (rows, tokens, out)
            result = result.index_add(0, idx, delta.reshape((len(idx),) + result.shape[1:]).to(result.dtype))
        start = end
    return result.to(out_dtype)


def _stacked_sum(layer, x: torch.Tensor, x3: torch.Tensor, result: torch.Tensor, groups: list):
    """`result` plus each stacked group's LoRA output on its rows. No autograd here (`stacked.usable`), so
    the sums are formed in place: in the base output when this forward made it and nobody else can hold it
    (`_owned_output`), else in the copy the first group's out-of-place sum makes (one copy of the
    (batch, tokens, out) output per layer instead of one per group)."""
    own = _owned_output(layer, result, x)
    for group in groups:
        if group.rows is None:  # the whole batch in order: no gather / scatter of activations
            delta = group_output(x3, group).reshape(result.shape).to(result.dtype)
            result = result.add_(delta) if own else result + delta
        else:
            delta = group_output(x3.index_select(0, group.rows), group)
            delta = delta.reshape((len(group.rows),) + result.shape[1:]).to(result.dtype)
            result = (result.index_add_ if own else result.index_add)(0, group.rows, delta)
        own = True
    return result


def _owned_output(layer, result: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the base output is a tensor this forward made that nobody else holds: a plain `nn.Linear`
    base with no forward hook (a hook, also a global one, may keep its output) and its own `forward`."""
    base = layer.get_base_layer()
    return (type(base) is nn.Linear and not base._forward_hooks and "forward" not in base.__dict__
            and not _module_mod._global_forward_hooks and result is not x)


def group_output(x: torch.Tensor, group: Group, scale: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA output of each row with its own adapter: x (rows, tokens, in) -> (rows, tokens, out). `scale`: the
    rows' scalings as a tensor (any float dtype; built from `group.scaling` if not given). A
    `stacked.StackedGroup` reads its stacks (rows in its order)."""
    if isinstance(group, stacked.StackedGroup):
        return stacked.stacked_output(x, group)
    a = torch.stack(group.a)  # (rows, r, in)
    b = torch.stack(group.b)  # (rows, out, r)
    x = x.to(a.dtype)  # dropout is the identity here (eval mode or p == 0, see _factors)
    if scale is None:
        scale = index_tensor(group.scaling, a.device, torch.float64)
    hidden = torch.bmm(x, a.transpose(1, 2)) * scale.to(a.dtype).view(-1, 1, 1)  # (rows, tokens, r)
    return torch.bmm(hidden, b.transpose(1, 2))  # (rows, tokens, out)


# ---- merged weights per adapter for long rows (inference only)
def merged_plan(layer, x: torch.Tensor, adapter_names: list[str]) -> list[tuple] | None:
    """[(factors or None for base rows, rows)] when every adapter's rows are long enough for a merged weight;
    None: use the other paths (training, a base layer other than nn.Linear, mixed dtypes, short rows)."""
    base = layer.get_base_layer()
    if (layer.merged or type(base) is not nn.Linear or layer.fan_in_fan_out
        or torch.is_grad_enabled() or x.dim() < 3
            or not x.numel() or x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type)
            or not _runs_as_is(base, base.weight)):
        return None
    rows_of = stacked.row_plan(adapter_names)  # once per call for all layers
    need = MERGE_FROM * layer.in_features * layer.out_features / (layer.in_features + layer.out_features)
    tokens_per_row = x.numel() // (x.shape[0] * x.shape[-1])
    if rows_of.most * tokens_per_row < need:  # no name's rows are long enough (decode): skip the loop below
        return None
    view = _layer_view(layer)
    groups, base_rows = [], []
    for name, rows in zip(rows_of.names, rows_of.rows):
        item = _factors(view, name)
        if item is None:
            base_rows += rows
            continue
        if item is False or item[0][1] != x.dtype or len(rows) * tokens_per_row < need:
            return None
        groups.append((item, rows))
    return groups + [(None, sorted(base_rows))] if base_rows else groups


def merged_forward(layer, x: torch.Tensor, groups: list[tuple], adapter_names: list[str]) -> torch.Tensor:
    """Rows of each adapter through `W + s B A` (base rows through W): the LoRA output, one matmul per
    group."""
    layer.check_mixed_batch(x, adapter_names)
    base = layer.get_base_layer()
    if len(groups) == 1:
        return F.linear(x, _merged_weight(base.weight, groups[0][0]), base.bias)
    out = x.new_empty(x.shape[:-1] + (base.out_features,))
    for item, rows in groups:
        idx = index_tensor(rows, x.device)
        out.index_copy_(0, idx, F.linear(x.index_select(0, idx),
                                         _merged_weight(base.weight, item), base.bias))
    return out


def _merged_weight(weight: torch.Tensor, item) -> torch.Tensor:
    if item is None:
        return weight
    _, a, b, scaling = item
    return torch.addmm(weight, b, a, alpha=scaling)  # W + s B A
