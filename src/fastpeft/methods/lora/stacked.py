"""Stacked LoRA factors kept across calls, for mixed-adapter batches without autograd (serving).

The gathered path (`gathered.py`) needs, per layer and rank, all A factors as one (n, r, in) tensor and all B
factors as one (n, out, r) tensor. Stacking them on every call copies every factor of the batch's adapters on
every layer (1024 adapters of rank 8 on a 2048 x 2048 projection: 64 MiB per layer and call, fp32).

Here the stacked tensors are built once and each adapter's `weight` parameter is re-pointed to its slice
(`param.data = stack[i]`, the same bytes): the stack *is* the parameters' storage, so any in-place write to a
parameter (optimizer steps, `param.copy_`, `param.data.copy_`, loaders that write through `.data`) is a write
into the stack, with no copy to go stale and no extra memory. Whatever gives a parameter other storage
(`param.data = t`, `model.to(dtype / device)`, a new module, an adapter added or deleted, a new scaling, a
hook) changes what `_signature` reads: its data pointer can only fall inside a stack that this cache keeps
alive if it is still that stack's slice, so a changed pointer means new storage, and the stacks are rebuilt
(the parameters re-pointed again) on the next call. So after `param.data = t`, `t` is copied into the new
stack and stops aliasing the parameter; a deleted adapter's bytes go with the next rebuild.

Per call, the rows are grouped once (`RowPlan`, shared by all layers: the row -> adapter map is the same on
each), and each layer keeps the index tensors of the last few row plans it saw, so a decode step of
`generate` costs each layer a signature check (O(adapters), pointer reads) and a few batched matmuls.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, contains
from typing import NamedTuple

import torch
from torch import nn

from ...core.device_index import index_tensor

# row plans kept (keyed on the names): a server alternates between few batch compositions per step
_ROW_PLANS: dict[tuple, RowPlan] = {}
_MAX_ROW_PLANS = 8
_MAX_LAYER_PLANS = 4


class RowPlan:
    """The batch's rows grouped by adapter name, in first-appearance order of the names."""

    __slots__ = ("names", "rows", "most", "__weakref__")

    def __init__(self, adapter_names: list[str]) -> None:
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(row)
        self.names = list(rows)
        self.rows = list(rows.values())
        self.most = 0  # the largest row count of one name (a loop: torch.compile traces this too)
        for group in self.rows:
            self.most = max(self.most, len(group))


def row_plan(adapter_names: list[str]) -> RowPlan:
    """The `RowPlan` of `adapter_names`, made once for all layers of a call (and reused by later calls with
    the same names, e.g. every decode step of `generate`)."""
    key = tuple(adapter_names)
    found = _ROW_PLANS.get(key)
    if found is None:
        if len(_ROW_PLANS) >= _MAX_ROW_PLANS:
            _ROW_PLANS.pop(next(iter(_ROW_PLANS)))
        found = _ROW_PLANS[key] = RowPlan(adapter_names)
    return found


def usable(layer) -> bool:
    """Stacks serve calls that need no gradient, in eval mode (dropout off), outside torch.compile (which
    traces the plain gathered path instead)."""
    return not (torch.is_grad_enabled() or layer.training or torch.compiler.is_compiling())


class Stack(NamedTuple):
    """Factors of the adapters of one (rank, dtype, device) on a layer: A (n, r, in), B (n, out, r) and the
    scalings (n,), row i of each belonging to `names[i]`."""

    names: list[str]
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor


class StackedGroup(NamedTuple):
    """One stack's share of a call. `rows` (the batch rows it serves, adapter-major; None: the whole batch in
    order), `pos` (stack indices of the adapters, one per `k` consecutive rows, or one per row; None: the
    whole stack in order), `k` rows per adapter, `slot` (where each row sits in the (adapters * k) padded
    layout when adapters have different row counts; None: no padding)."""

    stack: Stack
    rows: torch.Tensor | None
    pos: torch.Tensor | None
    k: int
    slot: torch.Tensor | None


class LayerCache:
    """A layer's stacks, the signature they were built for, and its recent per-call plans."""

    def __init__(self, signature: list, keep: list, stacks: dict, where: dict) -> None:
        self.signature = signature
        self.keep = keep  # the modules and parameters read: alive, so their ids stay theirs
        self.stacks = stacks  # (rank, dtype, device) -> Stack
        self.where = where  # adapter name -> (stack key, index) for adapters the stacks serve
        self.plans: dict[int, tuple] = {}  # id(RowPlan) -> (RowPlan, list[StackedGroup] | None)


_PARAMS = attrgetter("_parameters")
_HOOKS, _PRE_HOOKS = attrgetter("_forward_hooks"), attrgetter("_forward_pre_hooks")
_DICT = attrgetter("__dict__")


def _signature(layer) -> tuple[list, list]:
    """What the stacks depend on, as lists of names / ints / bools that compare in C (this runs on every
    call: ~12 map passes over the adapters' modules, no Python loop; ~0.2 ms per layer at 256 adapters): the
    adapters' names, the ids of their A / B modules, weights and B biases, the weights' data pointers,
    whether the modules have hooks or a `forward` override (a stacked module has none: these flags are what
    makes one stackable), and the scalings. (`keep`: the objects whose ids are listed, kept alive with the
    stacks so that no other object can take an id over.)"""
    a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
    mods = [*a_mods.values(), *b_mods.values()]
    params = list(map(_PARAMS, mods))
    weights = list(map(dict.get, params, repeat("weight")))
    try:
        pointers = list(map(torch.Tensor.data_ptr, weights))
    except TypeError:  # a module without a weight: not a plain LoRA layer, never stacked
        return [None], []
    biases = list(map(dict.get, params[len(a_mods):], repeat("bias")))
    sig = [list(a_mods), list(b_mods), list(map(id, mods)), list(map(id, weights)), list(map(id, biases)),
           pointers, list(map(bool, map(_HOOKS, mods))), list(map(bool, map(_PRE_HOOKS, mods))),
           list(map(contains, map(_DICT, mods), repeat("forward"))), dict(layer.scaling)]
    return sig, [mods, weights, biases]


def _stackable(a_mod: nn.Module, b_mod: nn.Module) -> bool:
    """Whether reading the factors directly is what calling the modules would do (no LoRA bias, no hooks,
    no accelerate `forward` swapping weights in, not offloaded to meta), with one dtype for both, held in
    plain tensors (a sharded DTensor's storage is not ours to re-point)."""
    a, b = a_mod._parameters.get("weight"), b_mod._parameters.get("weight")
    return (b_mod._parameters.get("bias") is None and a.dtype == b.dtype
            and all(type(w.data) is torch.Tensor and not w.is_meta and "forward" not in m.__dict__
                    and not m._forward_pre_hooks and not m._forward_hooks
                    for m, w in ((a_mod, a), (b_mod, b))))


def layer_cache(layer) -> LayerCache | None:
    """The layer's stacks, rebuilt when its signature changed since they were built (None: not stackable)."""
    cache = layer.__dict__.get("_lora_stacks")
    signature, keep = _signature(layer)
    if cache is None or cache.signature != signature:
        if signature == [None]:
            return None
        cache = _build(layer)
        layer.__dict__["_lora_stacks"] = cache  # a plain attribute: not a buffer, not in state_dict
    return cache


def _build(layer) -> LayerCache:
    by_key: dict[tuple, list[str]] = {}
    for name, a_mod in layer.lora_A._modules.items():
        b_mod = layer.lora_B._modules.get(name)
        if b_mod is not None and _stackable(a_mod, b_mod):
            a = a_mod.weight
            by_key.setdefault((a.shape[0], a.dtype, a.device), []).append(name)
    stacks, where = {}, {}
    # normal tensors even inside inference_mode: the parameters keep being trainable afterwards
    with torch.inference_mode(False), torch.no_grad():
        for key, names in by_key.items():
            stacks[key] = _stack(layer, names)
            where.update({name: (key, i) for i, name in enumerate(names)})
    layer.__dict__.pop("_lora_stacks", None)  # the old stacks go when no parameter views them
    signature, keep = _signature(layer)  # the parameters' new data pointers
    return LayerCache(signature, keep, stacks, where)


def _stack(layer, names: list[str]) -> Stack:
    a_params = [layer.lora_A[name].weight for name in names]
    b_params = [layer.lora_B[name].weight for name in names]
    a, b = torch.stack([p.detach() for p in a_params]), torch.stack([p.detach() for p in b_params])
    for i, (pa, pb) in enumerate(zip(a_params, b_params)):
        pa.data, pb.data = a[i], b[i]
    scale = torch.tensor([layer.scaling[name] for name in names], dtype=torch.float64, device=a.device)
    return Stack(names, a, b, scale.to(a.dtype))


def stacked_plan(layer, rows: RowPlan, min_adapters: int):
    """The call's `StackedGroup`s on `layer`; None: fewer than `min_adapters` of the batch's adapters are on
    it (the loop is cheaper); False: one of them cannot be served from a stack (the plain gathered path)."""
    cache = layer_cache(layer)
    if cache is None:
        return False
    found = cache.plans.get(id(rows))
    if found is not None and found[0] is rows:
        return found[1]
    groups = _plan_groups(layer, cache, rows, min_adapters)
    if len(cache.plans) >= _MAX_LAYER_PLANS:
        cache.plans.pop(next(iter(cache.plans)))
    cache.plans[id(rows)] = (rows, groups)
    return groups


def _plan_groups(layer, cache: LayerCache, rows: RowPlan, min_adapters: int):
    own = layer.lora_A._modules
    per_stack: dict[tuple, list[tuple[int, list[int]]]] = {}
    used = 0
    for name, name_rows in zip(rows.names, rows.rows):
        if name not in own:
            continue
        spot = cache.where.get(name)
        if spot is None:
            return False
        used += 1
        per_stack.setdefault(spot[0], []).append((spot[1], name_rows))
    if used < min_adapters:
        return None
    batch = sum(len(r) for r in rows.rows)
    device = next(iter(cache.stacks.values())).a.device
    return [_group(cache.stacks[key], items, batch, device) for key, items in per_stack.items()]


def _group(stack: Stack, items: list[tuple[int, list[int]]], batch: int, device) -> StackedGroup:
    counts = [len(r) for _, r in items]
    k, n_rows = max(counts), sum(counts)
    order = [row for _, r in items for row in r]
    pos = [i for i, _ in items]
    slot = None
    if min(counts) != k:
        if len(items) * k > 2 * n_rows:  # padding would double the work: one stack entry per row
            pos, k = [i for i, r in items for _ in r], 1
        else:
            slot = index_tensor([j * k + t for j, (_, r) in enumerate(items) for t in range(len(r))], device)
    rows_t = None if order == list(range(batch)) else index_tensor(order, device)
    pos_t = None if pos == list(range(len(stack.names))) else index_tensor(pos, device)
    return StackedGroup(stack, rows_t, pos_t, k, slot)


def stacked_output(x: torch.Tensor, group: StackedGroup) -> torch.Tensor:
    """LoRA output of the group's rows: x (rows in `group.rows` order, tokens, in) -> (rows, tokens, out)."""
    stack = group.stack
    a, b, scale = stack.a, stack.b, stack.scale
    if group.pos is not None:
        pos = group.pos
        a, b, scale = a.index_select(0, pos), b.index_select(0, pos), scale.index_select(0, pos)
    n, tokens = a.shape[0], x.shape[1]
    x = x.to(a.dtype)
    if group.slot is not None:  # adapters with fewer rows padded with zero rows to k each
        x = x.new_zeros((n * group.k,) + x.shape[1:]).index_copy_(0, group.slot, x)
    hidden = torch.bmm(x.reshape(n, group.k * tokens, -1), a.transpose(1, 2)) * scale.view(-1, 1, 1)
    if group.k * tokens == 1:
        # one token per adapter (decode): B (out, r) on the left, where oneDNN streams the (n, out, r) stack
        # faster than as the transposed right operand (bf16, n = 85 - 341, r = 8 - 32, one thread: 7.2 - 7.6
        # vs 6.1 - 6.6 GB/s), and the (n, out, 1) output is already (n, 1, out) in memory
        out = torch.bmm(b, hidden.transpose(1, 2)).view(n, tokens, -1)
    else:  # the transposed (n, out, tokens) output would make the sum with the base output a strided pass
        out = torch.bmm(hidden, b.transpose(1, 2)).reshape(n * group.k, tokens, -1)  # (n * k, tokens, out)
    return out if group.slot is None else out.index_select(0, group.slot)
