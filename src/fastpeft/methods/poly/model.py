"""`PolyModel`: the tuner of the POLY method (nn.Linear targets, routing by the `task_ids` of each call)."""

from __future__ import annotations

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets
from .layer import CONTEXT_KEY, PolyLinear

DISPATCH = DispatchChain("Poly")
DISPATCH.register(nn.Linear, PolyLinear)

POLY_TARGETS = LORA_TARGETS  # as HF PEFT: Poly's default target_modules are LoRA's


class PolyModel(Tuner):
    dispatch = DISPATCH

    def prepare_config(self, config, model: nn.Module):
        return fill_targets(config, model, POLY_TARGETS, "Poly")

    # as HF PEFT's PolyModel, the tuner itself takes task_ids in forward / generate
    def forward(self, *args, **kwargs):
        return self.model_forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model_generate(*args, **kwargs)

    # read by call_context below; the generic tuner drops other methods' keywords
    call_keywords = ("task_ids",)

    def call_context(self, args: tuple, kwargs: dict, adapter_names: list[str] | None,
                     copies: int = 1) -> dict:
        """Take `task_ids` out of the call: one task index per input row, checked against each active
        adapter's n_tasks; generate's extra rows per input (`copies`) reuse their input's task (see
        PolyLinear.task_rows)."""
        task_ids = kwargs.pop("task_ids", None)
        if task_ids is None:
            return {}  # layers that need a task raise (adapters disabled or "__base__" rows need none)
        ids = checked_task_ids(task_ids, self._task_limits(adapter_names))
        return {CONTEXT_KEY: {"ids": ids, "copies": copies}}

    def _task_limits(self, adapter_names: list[str] | None) -> dict[str, int]:
        names = self.active_adapters if adapter_names is None else set(adapter_names) - {"__base__"}
        return {name: self.peft_config[name].n_tasks for name in names if name in self.peft_config}

    def check_mergeable(self) -> None:
        raise NotImplementedError(
            "Poly adapters cannot be merged: each row's update depends on its task id, so no single weight "
            "matrix expresses them (HF PEFT does not merge Poly either). Keep them "
            "unmerged, or use unload().")


def checked_task_ids(task_ids, limits: dict[str, int]) -> torch.Tensor:
    """`task_ids` as a 1-D long tensor whose values are valid task indices of every adapter in `limits`."""
    ids = torch.as_tensor(task_ids)
    if ids.dim() == 0:
        ids = ids.reshape(1)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be integer task indices of shape (batch,), got dtype {ids.dtype} "
                         f"and shape {tuple(ids.shape)}.")
    ids = ids.long()
    if ids.numel() == 0:
        return ids
    low, high = int(ids.min()), int(ids.max())
    for name, n_tasks in limits.items():
        if low < 0 or high >= n_tasks:
            raise ValueError(
                f"task_ids must lie in [0, {n_tasks}) for Poly adapter '{name}' (n_tasks={n_tasks}), "
                f"got values from {low} to {high}; raise n_tasks in its PolyConfig or fix task_ids.")
    return ids
