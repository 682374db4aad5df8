"""Poly layers: per-task mixtures of a small inventory of low-rank "skills" on nn.Linear.

Polytropon (Ponti et al., 2022, arXiv:2202.13914): layer l holds skills (A_k, B_k), k < n_skills; a router
keeps one logit per (task, skill) and turns it into mixing weights w (a relaxed Bernoulli sample while
training, a sigmoid at inference, normalised to sum to 1). A row of task t gets x @ (sum_k w_k A_k) @ (sum_k
w_k B_k) / r. Multi-Head Routing (Caccia et al., 2022, arXiv:2211.03831) cuts the input features of A and the
output features of B into `n_splits` blocks, each with its own mixing weights.

The task of each row reaches the layers through the tuner's per-call `forward_context` (model.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from ...core.layer import AdapterLayer

CONTEXT_KEY = "poly_task_ids"  # forward_context entry: {"ids": (batch,) long tensor, "copies": rows per id}
_EPS = 1e-12


class PolyRouter(nn.Module):
    """Task -> (n_splits, n_skills) mixing weights; its only tensor is `module_logits` (n_tasks,
    splits*skills)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_tasks, self.n_splits, self.n_skills = n_tasks, n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))

    def reset(self) -> None:
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:  # Gumbel-sigmoid sample, differentiable in the logits (paper sec. 3)
            gates = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            gates = torch.sigmoid(logits)
        return gates / (gates.sum(dim=-1, keepdim=True) + _EPS)


class PolyLinear(AdapterLayer):
    """Poly on an nn.Linear; tensors named as HF PEFT's (`poly_lora_A`, `poly_lora_B`, `poly_router`)."""

    adapter_param_names = ("poly_lora_A", "poly_lora_B", "poly_router")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.n_tasks: dict[str, int] = {}
        self.n_skills: dict[str, int] = {}
        self.n_splits: dict[str, int] = {}
        self.poly_type: dict[str, str] = {}
        self.poly_router = nn.ModuleDict()  # (registered first, as HF PEFT: same parameter order)
        self.poly_lora_A = nn.ParameterDict()  # (n_splits, n_skills, in_features / n_splits, r)
        self.poly_lora_B = nn.ParameterDict()  # (n_splits, n_skills, r, out_features / n_splits)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, config)
        self._active_adapters = [adapter_name]

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        splits, skills, r = config.n_splits, config.n_skills, config.r
        for what, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % splits:
                raise ValueError(f"Poly: n_splits={splits} does not divide {what}={size} of a targeted "
                                 f"{type(self.base_layer).__name__}; pick n_splits dividing both feature "
                                 "sizes of every target, or leave this module out of target_modules.")
        self.r[adapter_name] = r
        self.n_tasks[adapter_name] = config.n_tasks
        self.n_skills[adapter_name] = skills
        self.n_splits[adapter_name] = splits
        self.poly_type[adapter_name] = config.poly_type
        self.poly_lora_A[adapter_name] = nn.Parameter(
            torch.empty(splits, skills, self.in_features // splits, r))
        self.poly_lora_B[adapter_name] = nn.Parameter(
            torch.empty(splits, skills, r, self.out_features // splits))
        self.poly_router[adapter_name] = PolyRouter(config.n_tasks, splits, skills)
        self.reset_poly_parameters(adapter_name, config.init_weights)

    def reset_poly_parameters(self, name: str, init_weights: bool) -> None:
        """Each skill block gets nn.Linear's default (Kaiming-uniform) init, drawn as a (fan_out, fan_in)
        matrix (same draw order as HF PEFT); B is zero unless `init_weights=False`."""
        _kaiming_blocks(self.poly_lora_A[name])
        if init_weights:
            nn.init.zeros_(self.poly_lora_B[name])
        else:
            _kaiming_blocks(self.poly_lora_B[name])
        self.poly_router[name].reset()

    # ------------------------------------------------------------------ forward
    def task_rows(self, rows: int) -> torch.Tensor:
        """The task id of each of the `rows` input rows, from the current call's context."""
        context = (getattr(self, "forward_context", None) or {}).get(CONTEXT_KEY)
        if context is None:
            raise ValueError("Poly adapters need task_ids: pass task_ids=torch.LongTensor of shape (batch,) "
                             "with each row's task index to forward() / generate() of the PeftModel.")
        ids, copies = context["ids"], context["copies"]
        if rows == ids.shape[0]:
            return ids
        if rows == ids.shape[0] * copies:  # generate's expanded rows (beams / num_return_sequences)
            return ids.repeat_interleave(copies)
        raise ValueError(f"task_ids has {ids.shape[0]} entries but a Poly layer got a batch of {rows} rows; "
                         "pass one task id per row of the input batch.")

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.poly_output(name, x, self.task_rows(x.shape[0]))

    def poly_output(self, name: str, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """x @ A_mix(task) @ B_mix(task) / r per row; x: (batch, ..., in_features)."""
        a_skills, b_skills, r = self.poly_lora_A[name], self.poly_lora_B[name], self.r[name]
        weights = self.poly_router[name](tasks)  # (batch, splits, skills)
        rows = weights.shape[0]
        a_mix = torch.einsum("bqs,qsir->bqir", weights, a_skills).reshape(rows, self.in_features, r)
        b_mix = torch.einsum("bqs,qsro->brqo", weights, b_skills).reshape(rows, r, self.out_features)
        flat = x.to(a_mix.dtype).reshape(rows, -1, self.in_features)
        out = flat.bmm(a_mix).bmm(b_mix) / r
        return out.reshape(*x.shape[:-1], self.out_features)

    def mixed_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Each row uses its own adapter and, as always with Poly, its own task id."""
        self.check_mixed_batch(x, adapter_names)
        result = self.base_forward(x, *args, **kwargs)
        names = sorted(set(adapter_names) & self.adapter_names())
        tasks = self.task_rows(x.shape[0]) if names else None
        for name in names:
            idx = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=result.device)
            rows = self.poly_output(name, x[idx], tasks[idx.to(tasks.device)])
            result = result.index_add(0, idx, rows.to(result.dtype))
        return result

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(
            f"Poly adapter '{name}' cannot be merged: its update depends on each row's task id, so no single "
            "weight matrix expresses it (HF PEFT does not merge Poly either). Keep it unmerged, or unload().")

    def merge_one(self, name: str, safe_merge: bool) -> None:
        self.delta_weight(name)


def _kaiming_blocks(param: nn.Parameter) -> None:
    """Fill every (split, skill) block (rows, cols) of `param` with the transpose of an nn.Linear-style
    Kaiming-uniform (cols, rows) matrix, looping skills outside splits."""
    splits, skills, rows, cols = param.shape
    with torch.no_grad():
        for skill in range(skills):
            for split in range(splits):
                block = torch.empty(cols, rows)
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                param[split, skill] = block.T
