"""LoRA-GA, LoRA with gradient approximation (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation", arXiv:2407.05000).

The gradient G of the loss w.r.t. each target weight is estimated on a few batches; with G ~ U S V^T, the
factors start as A = V[:, a]^T and B = U[:, b] diag(S[b]) for two disjoint sets a, b of the top 2r components
(`direction`), so the first update of B A follows full fine-tuning's first step. The base keeps W - s B A:
outputs are unchanged.

Workflow, as HF PEFT: `preprocess_loraga(model, config, train_step=...)` (runs forward + backward on a few
batches), then `get_peft_model(model, config)` with init_lora_weights="lora_ga". Gradient cache files use HF
PEFT's keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ....checkpoint import io
from ..subconfig import for_init, register_check
from .common import base_weight, check_decomposable, is_transposed, kaiming, zero_product
from .corda import linear_targets

logger = logging.getLogger(__name__)

GRADIENT_ATTR = "_fastpeft_loraga"  # set on each target base layer by preprocess_loraga, consumed at init
CACHE_SUFFIX = "._peft_loraga_grad"  # HF PEFT's cache keys: f"{layer name}._peft_loraga_grad"
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
SVD_ITERATIONS = 4
NO_ESTIMATE = ("init_lora_weights='lora_ga': a target layer has no gradient estimate, so it starts as plain "
               "LoRA (kaiming A, zero B, base unchanged). Expected while loading a saved adapter; for a new "
               "adapter run preprocess_loraga(model, lora_config, train_step=...) before get_peft_model.")


@dataclass
class LoraGAConfig:
    """Settings of the LoRA-GA init (HF PEFT 0.21's fields and defaults).

    direction: which of the top 2r gradient components go to A and which to B: 'ArB2r' (A: 0..r-1, B:
    r..2r-1), 'A2rBr' (A: r..2r-1, B: 0..r-1), 'ArBr' (A: odd, B: even) or 'random' (r random ones, shared by
    A and B). scale: 'stable' (B *= out^(1/4) / sqrt(stable_gamma)), 'weight_svd' (B's top singular value set
    to W's), 'gd_scale' (both divided by the LoRA scaling) or 'unit' (none).
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(default="ArB2r", metadata={
        "help": "Which gradient components go to A and B."})
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(default="stable", metadata={
        "help": "How the factors are scaled."})
    stable_gamma: int = field(default=16, metadata={"help": "gamma of the 'stable' scale."})

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"LoraGAConfig.direction must be one of {list(DIRECTIONS)}, got {self.direction!r}.")
        if self.scale not in SCALES:
            raise ValueError(f"LoraGAConfig.scale must be one of {list(SCALES)}, got {self.scale!r}.")
        if self.scale == "stable" and not self.stable_gamma > 0:
            raise ValueError(f"LoraGAConfig.stable_gamma must be positive, got {self.stable_gamma!r}.")


def check_config(config) -> None:
    """LoraConfig's `lora_ga_config` as a LoraGAConfig (files hold a dict)."""
    config.lora_ga_config = for_init(config.lora_ga_config, LoraGAConfig, "lora_ga_config",
                                     config.init_lora_weights, "lora_ga", default=False)


register_check("lora_ga_config", check_config)


@dataclass
class GradientEstimate:
    """What preprocess_loraga leaves on a base layer: its mean weight gradient, and the preprocessing config's
    lora_ga_config (used only if the LoraConfig given to get_peft_model has none)."""

    grad: torch.Tensor
    lora_ga_config: LoraGAConfig


# ---------------------------------------------------------------------------------------------- preprocessing
def _targets(model: nn.Module, lora_config) -> list[tuple[str, nn.Module]]:
    targets = list(linear_targets(model, lora_config))
    if not targets:
        raise ValueError("LoRA-GA: target_modules matched no nn.Linear / Conv1D layer of the model; LoRA-GA "
                         "works on linear layers only. Check target_modules.")
    quantized = [name for name, module in targets if hasattr(module, "quant_state")]
    if quantized:
        raise ValueError(f"LoRA-GA needs full-precision gradients, but {quantized} are quantized; preprocess "
                         "and initialise the unquantised model.")
    return targets


class _CallCounter:
    """Backward hook counting how often gradients flowed through a layer (one per forward use)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, grad_input, grad_output) -> None:
        self.calls += 1


def mean_gradients(model: nn.Module, lora_config, train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    """{layer name: weight gradient summed over train_step's backward passes / number of passes}.

    Only the target weights require grad meanwhile; requires_grad, .grad and train/eval mode are restored
    after.
    """
    targets = _targets(model, lora_config)
    was_training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    counters = {name: _CallCounter() for name, _ in targets}
    handles = [module.register_full_backward_hook(counters[name]) for name, module in targets]
    for param in flags:
        param.requires_grad_(False)
    for _, module in targets:
        module.weight.requires_grad_(True)
        module.weight.grad = None
    model.train()
    try:
        with torch.enable_grad():
            train_step()
        return {name: _mean_gradient(name, module, counters[name].calls) for name, module in targets}
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for _, module in targets:
            module.weight.grad = None
        model.train(was_training)


def _mean_gradient(name: str, module: nn.Module, calls: int) -> torch.Tensor:
    if calls == 0 or module.weight.grad is None:
        raise ValueError(f"LoRA-GA: no gradient reached layer '{name}' during train_step(); train_step must "
                         "run forward and loss.backward() through every target layer.")
    return module.weight.grad.detach() / calls


def _load_cache(model: nn.Module, targets, path: str) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    stored = io.load_weights_file(path, next(inner.parameters()).device)  # checked: never unpickles code
    missing = [name for name, _ in targets if f"{name}{CACHE_SUFFIX}" not in stored]
    if missing:
        raise ValueError(
            f"LoRA-GA: cache_file {path!r} has no gradient for {missing}; delete it to recompute.")
    return {name: stored[f"{name}{CACHE_SUFFIX}"] for name, _ in targets}


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config, train_step: Callable[[], None],
                      cache_file: str | None = None) -> None:
    """Estimate each target layer's weight gradient for init_lora_weights='lora_ga' (call before
    get_peft_model).

    train_step: runs forward and loss.backward() on a few batches (no optimizer step). cache_file: read the
    gradients from it when it exists, else write them to it. target_modules=None is filled in from the model
    type.
    """
    if getattr(lora_config, "lora_ga_config", None) is None:
        raise ValueError("preprocess_loraga needs LoraConfig(init_lora_weights='lora_ga', "
                         "lora_ga_config=LoraGAConfig(...)); lora_ga_config is not set.")
    targets = _targets(model, lora_config)
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        grads = _load_cache(model, targets, cache_file)
    else:
        grads = mean_gradients(model, lora_config, train_step)
        if cache_file is not None:
            cache = {f"{name}{CACHE_SUFFIX}": grad for name, grad in grads.items()}
            # torch.save format, atomic
            io.atomic_write_many([(cache_file, io.weights_writer(cache, safe=False))])
    for name, module in targets:
        setattr(module, GRADIENT_ATTR,
                GradientEstimate(grads[name], lora_ga_config=lora_config.lora_ga_config))


# ---------------------------------------------------------------------------------------------- init
def _split_arbr(r: int):
    return slice(1, 2 * r, 2), slice(0, 2 * r, 2)


def _split_a2rbr(r: int):
    return slice(r, 2 * r), slice(0, r)


def _split_arb2r(r: int):
    return slice(0, r), slice(r, 2 * r)


def _split_random(r: int):
    chosen = torch.randperm(2 * r)[:r]
    return chosen, chosen


# direction -> r -> (components for A, components for B)
SPLITS = {"ArBr": _split_arbr, "A2rBr": _split_a2rbr, "ArB2r": _split_arb2r, "random": _split_random}


def _scale_stable(layer, name, a, b, s_b, cfg):
    # HF PEFT uses weight.shape[0] as "out_features" (the input size for Conv1D): kept for identical factors
    rows = layer.get_base_layer().weight.shape[0]
    return a, b * ((rows ** 0.25) / (cfg.stable_gamma ** 0.5))


def _scale_weight_svd(layer, name, a, b, s_b, cfg):
    _, weight_s, _ = torch.svd_lowrank(_weight_out_in(layer), q=layer.r[name], niter=SVD_ITERATIONS)
    return (a, b * (weight_s[0] / s_b[0])) if s_b[0] > 0 else (a, b)


def _scale_gd(layer, name, a, b, s_b, cfg):
    s = layer.scaling[name]
    return a / s, b / s


def _scale_unit(layer, name, a, b, s_b, cfg):
    return a, b


SCALINGS = {"stable": _scale_stable, "weight_svd": _scale_weight_svd, "gd_scale": _scale_gd,
            "unit": _scale_unit}


def _weight_out_in(layer) -> torch.Tensor:
    weight = layer.get_base_layer().weight.data.to(torch.float32)
    return weight.T if is_transposed(layer) else weight


def gradient_factors(layer, name: str, grad: torch.Tensor, cfg: LoraGAConfig):
    """(A, B) in float32 from the top 2r singular triplets of `grad` (out, in), split and scaled as `cfg`
    says."""
    r = layer.r[name]
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=SVD_ITERATIONS)
    u, s, vh = u[:, :2 * r], s[:2 * r], v.T[:2 * r]
    for_a, for_b = SPLITS[cfg.direction](r)
    a, s_b = vh[for_a], s[for_b]
    b = u[:, for_b] @ torch.diag(s_b)
    return SCALINGS[cfg.scale](layer, name, a, b, s_b, cfg)


def _check_rank(layer, name: str, scheme: str) -> None:
    r, limit = layer.r[name], min(layer.in_features, layer.out_features)
    if 2 * r > limit:
        raise ValueError(
            f"init_lora_weights={scheme!r} splits the top 2r gradient components between A and B, so it "
            f"needs 2 * r <= min(in_features, out_features) = {limit}; got r={r} (weight shape "
            f"{tuple(layer.get_base_layer().weight.shape)}). Lower r or set rank_pattern for this layer.")


@torch.no_grad()
def lora_ga_init(layer, name: str, config=None) -> None:
    """Factors from the gradient estimate left by preprocess_loraga; the base keeps W - s B A.

    Without an estimate (while loading a saved adapter, whose weights then overwrite the factors; or a layer
    that is not linear) the layer gets the default init (kaiming A, zero B) and its base stays unchanged, as
    HF PEFT.
    """
    estimate = getattr(layer.get_base_layer(), GRADIENT_ATTR, None)
    if estimate is None:  # also embeddings and convolutions, which preprocess_loraga skips (as HF PEFT)
        if not (layer.is_embedding or getattr(layer.get_base_layer(), "kernel_size", None)):
            logger.warning(NO_ESTIMATE)
        zero_product(layer, name, kaiming)  # init_lora_weights=True's init
        return
    weight = base_weight(layer, "lora_ga")
    check_decomposable(layer, name, weight, "lora_ga")
    _check_rank(layer, name, "lora_ga")
    cfg = getattr(config, "lora_ga_config", None) or estimate.lora_ga_config
    dtype, transposed, s = weight.dtype, is_transposed(layer), layer.scaling[name]
    grad = estimate.grad.to(torch.float32)
    a, b = gradient_factors(layer, name, grad.T if transposed else grad, cfg)
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    weight_a, weight_b = layer.lora_weights(name)
    weight_a.data, weight_b.data = a, b
    residual = _weight_out_in(layer) - s * (b.float() @ a.float())
    residual = residual.to(dtype)
    layer.get_base_layer().weight.data = residual.T if transposed else residual
    delattr(layer.get_base_layer(), GRADIENT_ATTR)
