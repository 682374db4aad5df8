"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation", arXiv:2308.03303).

A is frozen at its initial value and only B trains. As in HF PEFT, B's gradient is first replaced by the
least-squares match of the full-weight gradient, g_B <- s^-2 g_B (A A^T + delta I)^+  (s = LoRA scaling,
i.e. (r / alpha)^2 (A A^T)^-1 applied to g_B), then fed to AdamW (bias-corrected steps, decoupled decay).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from .loraplus import lora_factors, lora_layers, require_trainable

# added to A A^T before the pseudo-inverse so a rank-deficient A stays well-posed (HF PEFT's value)
PROJECTION_DELTA = 1e-8


def _projected_grad_b(a: torch.Tensor, grad_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s^-2 * g_B @ pinv(A A^T + delta I), with A seen as (r, fan_in) and g_B as (fan_out, r)."""
    a2 = a.reshape(a.shape[0], -1)
    g2 = grad_b.reshape(grad_b.shape[0], -1)
    compute = torch.float32 if a2.dtype in (torch.float16, torch.bfloat16) else a2.dtype
    a2, g2 = a2.to(compute), g2.to(compute)
    gram = a2 @ a2.T + PROJECTION_DELTA * torch.eye(a2.shape[0], dtype=compute, device=a2.device)
    projected = (1 / scaling**2) * (g2 @ torch.linalg.pinv(gram))
    return projected.reshape(grad_b.shape).to(grad_b.dtype)


class LoraFAOptimizer(Optimizer):
    """AdamW (transformers' `adamw-hf` update) in which LoRA B factors get the projected gradient.

    Each param group may carry `lora_pairs`, a list aligned with `params`: None for an ordinary parameter
    (plain AdamW), -1 for a frozen A factor (never updated), or the index of its A factor for a B factor.
    It also needs `scaling_factors` (aligned, the LoRA scaling of each factor's adapter). Use
    `create_lorafa_optimizer` to build these groups from a LoRA model.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"Learning rate must be >= 0, got {lr}.")
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Each beta must lie in [0, 1), got {betas}.")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def _adamw_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step = state["step"]
            step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled decay, applied after the Adam step
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            pairs = group.get("lora_pairs")
            if pairs is None:
                if "scaling_factors" in group or "scaling_factor" in group:
                    raise ValueError("LoraFAOptimizer param groups need `lora_pairs`; build them with "
                                     "create_lorafa_optimizer(model, ...).")
                pairs = [None] * len(params)
            scalings = group.get("scaling_factors", [None] * len(params))
            for param, pair, scaling in zip(params, pairs, scalings):
                if pair == -1 or param.grad is None:  # frozen A factor, or nothing to apply
                    continue
                grad = param.grad
                if pair is not None:
                    grad = _projected_grad_b(params[pair], grad, scaling)
                self._adamw_update(param, grad, group)
        return loss


def _resolve_rslora(model: nn.Module, use_rslora: bool | None) -> None:
    """Check the deprecated `use_rslora` argument against the active adapters' configs (as HF PEFT does)."""
    if use_rslora is None:
        return
    configs = getattr(model, "peft_config", {}) or {}
    active = [a for a in getattr(model, "active_adapters", []) if a in configs]
    mismatched = [a for a in active if bool(getattr(configs[a], "use_rslora", False)) != use_rslora]
    if mismatched:
        raise ValueError(
            f"create_lorafa_optimizer got use_rslora={use_rslora}, but active adapters {mismatched} are "
            "configured otherwise. Set use_rslora in LoraConfig and drop the (deprecated) argument."
        )
    warnings.warn("The `use_rslora` argument of create_lorafa_optimizer is deprecated; rsLoRA is read from "
                  "each adapter's LoraConfig.", FutureWarning, stacklevel=3)


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: int, lr: float, weight_decay: float = 0.0,
                            use_rslora: bool | None = None) -> Optimizer:
    """Freeze every LoRA A factor of `model` and return a `LoraFAOptimizer` over all its parameters.

    The gradient projection uses each layer's own scaling (so rank / alpha patterns and rsLoRA are honoured);
    `r` and `lora_alpha` are accepted for HF PEFT compatibility. `use_rslora` is deprecated there too: when
    given it must agree with the active adapters' configs.
    """
    _resolve_rslora(model, use_rslora)
    role: dict[int, tuple[nn.Parameter | None, float]] = {}  # id -> (A of a B factor / None for A, scaling)
    for layer in lora_layers(model):
        for name in layer.adapter_names():
            scaling = layer.scaling[name]
            factors = lora_factors(layer, name)
            if factors is None:
                continue
            a, b = factors
            role[id(a)] = (None, scaling)
            role[id(b)] = (a, scaling)
    frozen = frozenset(key for key, (a, _) in role.items() if a is None)
    require_trainable(model, "create_lorafa_optimizer", frozen)  # checked before anything is frozen

    named = list(model.named_parameters())
    for _, param in named:
        if id(param) in frozen:
            param.requires_grad_(False)
    index = {id(p): i for i, (_, p) in enumerate(named)}
    pairs: list[int | None] = []
    scalings: list[float | None] = []
    for _, param in named:
        entry = role.get(id(param))
        pairs.append(None if entry is None else (-1 if entry[0] is None else index[id(entry[0])]))
        scalings.append(None if entry is None else entry[1])
    group = {
        "params": [p for _, p in named],
        "names": [n for n, _ in named],
        "lora_pairs": pairs,
        "scaling_factors": scalings,
        "lr": lr,
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
