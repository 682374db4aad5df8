"""Task-vector merging: combine same-shaped tensors of several tasks into one, with per-task weights.

Pure functions (no model state): `linear`, `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`, picked by
name through `MERGE_METHODS`. The math follows TIES-Merging (Yadav et al. 2023) and DARE (Yu et al. 2023).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Weights = Sequence[float] | torch.Tensor


# ---------------------------------------------------------------------------------------------- pruning
def magnitude_keep_top(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023), step 1 "trim": keep the int(density * n) largest |values|, zero the
    rest."""
    keep = int(density * tensor.numel())
    flat_mask = torch.zeros_like(tensor).reshape(-1)
    flat_mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * flat_mask.reshape(tensor.shape)


def random_drop_rescale(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each value with probability 1 - density, rescale survivors by 1 / density.

    The rescaling keeps the expectation: E[mask / density * x] = x. Draws from torch's global RNG (bernoulli).
    """
    if density <= 0:
        raise ValueError(
            f"DARE needs density > 0 (it rescales kept values by 1 / density), got {density}; "
            "pass density in (0, 1]."
        )
    mask = torch.bernoulli(torch.full_like(tensor, fill_value=density))
    return tensor * mask / density


PRUNERS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "magnitude": magnitude_keep_top,
    "random": random_drop_rescale,
}


def prune(tensor: torch.Tensor, density: float, method: str) -> torch.Tensor:
    """Sparsify `tensor` keeping a `density` fraction; density >= 1 keeps everything (logged)."""
    if density >= 1:
        logger.warning("density=%s >= 1: nothing is pruned.", density)
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1] (the fraction of values kept), got {density}.")
    return PRUNERS[method](tensor, density)


# ---------------------------------------------------------------------------------------------- sign election
def _sign_by_total(stacked: torch.Tensor) -> torch.Tensor:
    return stacked.sum(dim=0)


def _sign_by_frequency(stacked: torch.Tensor) -> torch.Tensor:
    return stacked.sign().sum(dim=0)


MAJORITY_SIGN_METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "total": _sign_by_total,  # sign of the summed values (TIES-Merging's "elect" by mass)
    "frequency": _sign_by_frequency,  # sign held by most tasks
}


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023), step 2 "elect": True where a task's value has the elected sign.

    Tasks are stacked on dim 0; ties (score 0) elect +. Zeros (pruned values) never agree.
    """
    if method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"Unknown majority_sign_method {method!r}; use one of {sorted(MAJORITY_SIGN_METHODS)}."
        )
    score = MAJORITY_SIGN_METHODS[method](stacked)
    elected = torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == elected


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023), step 3 "disjoint merge": mean over the tasks that agree with the
    sign."""
    agreeing = mask.sum(dim=0)
    return (weighted * mask).sum(dim=0) / torch.clamp(agreeing, min=1.0)


# ---------------------------------------------------------------------------------------------- merges
def _weights_like(stacked: torch.Tensor, weights: Weights) -> torch.Tensor:
    """Per-task weights as a float32 tensor broadcastable against the stacked tasks (dim 0)."""
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights), dtype=torch.float32)
    if w.numel() != stacked.shape[0]:
        raise ValueError(
            f"Got {w.numel()} weights for {stacked.shape[0]} task tensors; give one weight per task.")
    return w.to(stacked.device).reshape((-1,) + (1,) * (stacked.dim() - 1))


@dataclass(frozen=True)
class MergeMethod:
    """How a merge treats the task tensors: optional pruning, then a plain weighted sum or a TIES election."""

    pruner: str | None
    elect_sign: bool

    @property
    def needs_density(self) -> bool:
        return self.pruner is not None


MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(pruner=None, elect_sign=False),  # task arithmetic: sum_i w_i * t_i
    "magnitude_prune": MergeMethod(pruner="magnitude", elect_sign=False),
    "ties": MergeMethod(pruner="magnitude", elect_sign=True),  # Yadav et al. 2023
    "dare_linear": MergeMethod(pruner="random", elect_sign=False),  # Yu et al. 2023
    "dare_ties": MergeMethod(pruner="random", elect_sign=True),  # DARE pruning + TIES election
}


def check_merge_args(method: str, density: float | None, majority_sign_method: str = "total") -> MergeMethod:
    """Validate a merge request before any tensor is touched; return the method's spec."""
    if method not in MERGE_METHODS:
        raise ValueError(f"Unknown merge method {method!r}; use one of {sorted(MERGE_METHODS)}.")
    spec = MERGE_METHODS[method]
    if spec.needs_density and density is None:
        raise ValueError(
            f"Merge method {method!r} prunes the task tensors: pass density (fraction kept, in (0, 1]).")
    if spec.elect_sign and majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"Unknown majority_sign_method {majority_sign_method!r}; use one of "
            f"{sorted(MAJORITY_SIGN_METHODS)}."
        )
    return spec


def merge(method: str, tensors: Sequence[torch.Tensor], weights: Weights, density: float | None = None,
          majority_sign_method: str = "total") -> torch.Tensor:
    """Merge same-shaped task tensors with `weights` by `method` (a key of MERGE_METHODS).

    The sign is elected on the (pruned) unweighted tensors, then the weighted ones are averaged (TIES).
    """
    spec = check_merge_args(method, density, majority_sign_method)
    if not tensors:
        raise ValueError("Nothing to merge: pass at least one task tensor.")
    if spec.pruner is not None:
        tensors = [prune(t, density, spec.pruner) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    weighted = stacked * _weights_like(stacked, weights)
    if spec.elect_sign:
        return disjoint_mean(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


# HF PEFT's `peft.utils.merge_utils` functions, with its parameter names
def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: Weights) -> torch.Tensor:
    return merge("linear", task_tensors, weights)


def magnitude_prune(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float) -> torch.Tensor:
    return merge("magnitude_prune", task_tensors, weights, density)


def ties(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    return merge("ties", task_tensors, weights, density, majority_sign_method)


def dare_linear(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float) -> torch.Tensor:
    return merge("dare_linear", task_tensors, weights, density)


def dare_ties(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float,
              majority_sign_method: str = "total") -> torch.Tensor:
    return merge("dare_ties", task_tensors, weights, density, majority_sign_method)


linear = task_arithmetic
