"""LoRA's `add_weighted_adapter`: a new adapter built from weighted existing ones, as HF PEFT 0.21 builds it.

Three strategies, picked by `combination_type` through `COMBINATIONS`: merge the A and B factors separately,
concatenate them (`cat`), or merge the full deltas and refactor them by SVD (`*_svd`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import reduce

import torch

from ... import merging
from ...core.auxiliary import ModulesToSaveWrapper
from .variants import table as variant_table


@dataclass(frozen=True)
class Combination:
    strategy: str  # key of STRATEGIES: "factors", "cat" or "svd"
    task_merge: str | None  # key of merging.MERGE_METHODS applied to factors or deltas (None for cat)


COMBINATIONS: dict[str, Combination] = {
    "linear": Combination("factors", "linear"),
    "ties": Combination("factors", "ties"),
    "dare_linear": Combination("factors", "dare_linear"),
    "dare_ties": Combination("factors", "dare_ties"),
    "magnitude_prune": Combination("factors", "magnitude_prune"),
    "cat": Combination("cat", None),
    "svd": Combination("svd", "linear"),
    "ties_svd": Combination("svd", "ties"),
    "dare_linear_svd": Combination("svd", "dare_linear"),
    "dare_ties_svd": Combination("svd", "dare_ties"),
    "magnitude_prune_svd": Combination("svd", "magnitude_prune"),
}


@dataclass
class MergeRequest:
    adapters: list[str]
    weights: list[float]
    combination: Combination
    rank: int
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


# ---------------------------------------------------------------------------------------------- new rank
def _same_rank(ranks: list[int], svd_rank: int | None, combination_type: str) -> int:
    if len(set(ranks)) != 1:
        raise ValueError(
            f"combination_type={combination_type!r} merges the A and B factors entry by entry, so all "
            f"adapters need the same rank, got ranks {ranks}. Use 'cat' or an '*_svd' type (e.g. 'svd') "
            "for different ranks."
        )
    return ranks[0]


def _sum_rank(ranks: list[int], svd_rank: int | None, combination_type: str) -> int:
    return sum(ranks)  # cat stacks the factors: the new rank can get large with many adapters


def _svd_rank(ranks: list[int], svd_rank: int | None, combination_type: str) -> int:
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(
            f"svd_rank must be a positive integer or None (= the largest rank), got {svd_rank!r}.")
    return svd_rank or max(ranks)


RANK_RULES: dict[str, Callable[[list[int], int | None, str], int]] = {
    "factors": _same_rank,
    "cat": _sum_rank,
    "svd": _svd_rank,
}


def adapter_rank(config) -> int:
    """The largest rank any layer of the adapter has (its r, or more through rank_pattern)."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


# ---------------------------------------------------------------------------------------------- new config
def merged_target_modules(configs: list):
    """Union of the adapters' target_modules (sets), or an alternation of their regex strings."""
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ValueError(
            "Cannot combine adapters whose target_modules mix a regex string with a list/set of names; give "
            "all of them target_modules of the same kind (e.g. all lists of module names)."
        )
    if kinds == {True}:
        return "|".join(f"({c.target_modules})" for c in configs)
    return reduce(operator.or_, (set(c.target_modules) for c in configs))


def new_adapter_config(configs: list, rank: int):
    """The first adapter's config with the new rank, alpha = rank and use_rslora off (scaling exactly 1: the
    combined factors already carry each source's scaling) and the combined targets.

    HF PEFT keeps use_rslora from the first adapter, which scales the result by sqrt(rank) (peft issue #3761).
    """
    return replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False,
                   target_modules=merged_target_modules(configs), alpha_pattern={}, rank_pattern={})


# ---------------------------------------------------------------------------------------------- per layer
def _present(layer, req: MergeRequest) -> tuple[list[str], list[float]]:
    own = layer.adapter_names()
    pairs = [(n, w) for n, w in zip(req.adapters, req.weights) if n in own]
    if not pairs:
        raise ValueError(
            f"A layer got the merged adapter but holds none of {req.adapters} (their exclude_modules / "
            "layers_to_transform differ); merge adapters that target the same modules."
        )
    return [n for n, _ in pairs], [w for _, w in pairs]


def _factors(layer, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pairs = [layer.lora_weights(n) for n in names]
    return [a.data for a, _ in pairs], [b.data for _, b in pairs]


def combine_factors(layer, req: MergeRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge A's and B's separately; w * scaling is split as sqrt on each side, its sign carried by A."""
    names, weights = _present(layer, req)
    a_list, b_list = _factors(layer, names)
    if len({a.shape for a in a_list}) > 1 or len({b.shape for b in b_list}) > 1:
        raise ValueError(
            f"combination_type with task_merge={req.combination.task_merge!r} needs equal factor shapes per "
            f"layer; adapters {names} have ranks {[a.shape[0] for a in a_list]} here "
            "(rank_pattern?). Use 'cat' or 'svd'."
        )
    scaled = [w * layer.scaling[n] for n, w in zip(names, weights)]
    a_weights = [math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled]
    b_weights = [math.sqrt(abs(s)) for s in scaled]
    kwargs = dict(density=req.density, majority_sign_method=req.majority_sign_method)
    new_a = merging.merge(req.combination.task_merge, a_list, a_weights, **kwargs)
    new_b = merging.merge(req.combination.task_merge, b_list, b_weights, **kwargs)
    return new_a.to(a_list[0].dtype), new_b.to(b_list[0].dtype)


def combine_cat(layer, req: MergeRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the factors: [w1 s1 A1; w2 s2 A2] and [B1, B2], so B @ A = sum_i w_i s_i B_i @ A_i exactly."""
    names, weights = _present(layer, req)
    a_list, b_list = _factors(layer, names)
    a_scaled = [a * w * layer.scaling[n] for a, n, w in zip(a_list, names, weights)]
    return torch.cat(a_scaled, dim=0), torch.cat(b_list, dim=1)


def _to_factor_layout(layer, delta: torch.Tensor) -> torch.Tensor:
    """A weight-layout delta as the 2-D (out, flattened in) matrix that B @ A forms."""
    if layer.is_embedding or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T  # embedding tables and Conv1D store (in, out)
    return delta.flatten(1) if delta.dim() > 2 else delta


def _weight_deltas(layer, names: list[str]) -> list[torch.Tensor]:
    """Each adapter's delta in the base weight's layout, float32 or wider (the layout DARE's draws follow)."""
    deltas = [layer.delta_weight(n) for n in names]
    return [d.to(torch.promote_types(d.dtype, torch.float32)) for d in deltas]


def _svd_factors(delta: torch.Tensor, req: MergeRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of `delta`: B = U_r diag(S_r), A = Vh_r, optionally clamped at a quantile."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=req.svd_full_matrices, driver=req.svd_driver)
    keep = min(req.rank, s.numel())
    new_b, new_a = u[:, :keep] @ torch.diag(s[:keep]), vh[:keep, :]
    if req.svd_clamp is not None:
        limit = torch.quantile(torch.cat([new_b.flatten(), new_a.flatten()]), req.svd_clamp)
        new_b, new_a = new_b.clamp(-limit, limit), new_a.clamp(-limit, limit)
    return new_a, new_b


def combine_svd(layer, req: MergeRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the full deltas (task_merge), then refactor the result by a truncated SVD."""
    names, weights = _present(layer, req)
    delta = merging.merge(req.combination.task_merge, _weight_deltas(layer, names), weights,
                          density=req.density, majority_sign_method=req.majority_sign_method)
    new_a, new_b = _svd_factors(_to_factor_layout(layer, delta), req)
    a_ref, b_ref = layer.lora_weights(names[0])
    new_a = new_a.reshape((new_a.shape[0],) + tuple(a_ref.shape[1:]))
    new_b = new_b.reshape((new_b.shape[0], new_b.shape[1]) + tuple(b_ref.shape[2:]))
    return new_a, new_b


STRATEGIES: dict[str, Callable[[object, MergeRequest], tuple[torch.Tensor, torch.Tensor]]] = {
    "factors": combine_factors,
    "cat": combine_cat,
    "svd": combine_svd,
}


def _write_leading_block(param: torch.Tensor, value: torch.Tensor) -> None:
    """Zero `param` and write `value` into its leading block (ranks beyond the value's stay zero)."""
    if any(v > p for v, p in zip(value.shape, param.shape)) or value.dim() != param.dim():
        raise ValueError(f"Merged factor of shape {tuple(value.shape)} does not fit the new adapter's "
                         f"{tuple(param.shape)}; this is a bug, please report it.")
    param.data.zero_()
    param.data[tuple(slice(0, n) for n in value.shape)] = value.to(param.dtype)


def fill_layer(layer, adapter_name: str, req: MergeRequest) -> None:
    new_a, new_b = STRATEGIES[req.combination.strategy](layer, req)
    a, b = layer.lora_weights(adapter_name)
    with torch.no_grad():
        _write_leading_block(a, new_a)
        _write_leading_block(b, new_b)


# ---------------------------------------------------------------------------------------------- entry point
def _check_sources(tuner, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    if adapter_name in tuner.peft_config:
        raise ValueError(
            f"An adapter named '{adapter_name}' already exists; pick a new adapter_name or call "
            f"delete_adapter('{adapter_name}') first."
        )
    if not adapters:
        raise ValueError("adapters is empty: name at least one existing adapter to combine.")
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"Adapter(s) {missing} do not exist; loaded adapters: {sorted(tuner.peft_config)}.")
    if len(weights) != len(adapters):
        raise ValueError(
            f"Got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter.")
    biased = [a for a in adapters if tuner.peft_config[a].lora_bias]
    if biased:
        raise NotImplementedError(
            f"Adapter(s) {biased} use lora_bias=True; add_weighted_adapter combines only the A/B factors and "
            "would drop their biases. Combine adapters trained with lora_bias=False."
        )
    with_variant = {a: opt for a in adapters if (opt := variant_table.active_option(tuner.peft_config[a]))}
    if with_variant:
        raise NotImplementedError(
            f"Adapter(s) {with_variant} use a LoRA variant; add_weighted_adapter combines only the A/B "
            "factors, and the variant's own weights (e.g. DoRA's magnitude vector) have no weighted "
            "combination, so the result would silently differ from every source. Merge such adapters into "
            "the base instead (merge_and_unload), or combine adapters trained without the variant."
        )
    shared = [name for name, h in tuner.holders() if isinstance(h, ModulesToSaveWrapper)
              and sum(a in h.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError(
            f"Adapters {adapters} each keep their own trained copy of {shared} (modules_to_save); such "
            "copies cannot be combined. Combine adapters where at most one of them saves each module."
        )


def _check_options(combination_type: str, density, majority_sign_method: str, svd_clamp) -> Combination:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"Invalid combination_type {combination_type!r}; use one of {list(COMBINATIONS)}.")
    combination = COMBINATIONS[combination_type]
    if combination.task_merge is not None:
        merging.check_merge_args(combination.task_merge, density, majority_sign_method)
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in [0, 1] (e.g. 0.99), got {svd_clamp!r}.")
    return combination


def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total") -> None:
    """Add `adapter_name` to the LoRA `tuner`: the weighted combination of `adapters` (not activated)."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_sources(tuner, adapters, weights, adapter_name)
    if len(adapters) == 1:
        combination_type = "linear"  # one adapter: scaling its factors is exact
    combination = _check_options(combination_type, density, majority_sign_method, svd_clamp)
    configs = [tuner.peft_config[a] for a in adapters]
    rank = RANK_RULES[combination.strategy]([adapter_rank(c) for c in configs], svd_rank, combination_type)
    req = MergeRequest(adapters, weights, combination, rank, density, majority_sign_method, svd_clamp,
                       svd_full_matrices, svd_driver)
    tuner.peft_config[adapter_name] = new_adapter_config(configs, rank)
    tuner.inject_adapter(tuner.model, adapter_name)
    try:
        for layer in list(tuner.adapter_layers()):
            if adapter_name in layer.adapter_names():
                fill_layer(layer, adapter_name, req)
    except Exception:
        tuner.delete_adapter(adapter_name)
        raise
