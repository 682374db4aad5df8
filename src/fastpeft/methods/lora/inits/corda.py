"""CorDA, context-oriented decomposition adaptation (Yang et al. 2024, "CorDA: Context-Oriented Decomposition
Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning", arXiv:2406.05223).

Each linear layer's weight W (out, in) is multiplied by the covariance C of its inputs on a few calibration
samples and decomposed, W C = U S V^T, so W = U S (C^-1 V)^T. The adapter starts from r of these triplets and
the base keeps the rest, so base + adapter gives W back at init. IPM (instruction-previewed mode) takes the r
largest triplets, KPM (knowledge-preserved mode) the r smallest, leaving the directions the calibration data
relies on in the base.

Workflow, as HF PEFT: `preprocess_corda(model, config, run_model=...)` (hooks collect C while `run_model()`
runs the model on calibration data), then `get_peft_model(model, config)` with init_lora_weights="corda".
Cache and covariance files use HF PEFT's keys, so either library can read the other's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from copy import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ....checkpoint import io
from ....core import targeting
from ....integrations.transformers_defaults import LORA_TARGETS, default_targets
from ..._shared.modules import is_conv1d, is_linear
from ..subconfig import for_init, register_check
from .common import base_weight, check_decomposable, is_transposed

logger = logging.getLogger(__name__)

EIGENS_ATTR = "_fastpeft_corda_eigens"  # set on each target base layer by preprocess_corda, consumed at init
METHODS = ("ipm", "kpm")
INVERSE_TOLERANCE = 0.05  # || C' C'^-1 - I || below this accepts the damped covariance C'
FIRST_DAMPING = 0.01  # damping starts at 1% of C's mean diagonal and doubles until C' inverts well


@dataclass
class CordaConfig:
    """Settings of CorDA preprocessing (HF PEFT 0.21's fields and defaults).

    cache_file: where the cropped decompositions are stored (read instead of recomputing when present).
    covariance_file: where the input covariances are stored (reusable for other ranks). corda_method: 'ipm' or
    'kpm' (see the module docstring). verbose: log each layer as it is decomposed. use_float16_for_covariance:
    keep the inputs in the model's dtype instead of float32 when accumulating C. prune_temporary_fields: kept
    for file compatibility (fastpeft never leaves temporary fields on the modules).
    """

    cache_file: str | None = field(default=None, metadata={"help": "File for the decompositions (cache)."})
    covariance_file: str | None = field(default=None, metadata={"help": "File for the input covariances."})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "'ipm' or 'kpm'."})
    verbose: bool = field(default=False, metadata={"help": "Log progress of the decompositions."})
    use_float16_for_covariance: bool = field(default=False,
                                             metadata={"help": "Accumulate C in the model dtype."})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Accepted for compatibility."})

    def __post_init__(self) -> None:
        if self.corda_method is not None and self.corda_method not in METHODS:
            raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}.")


def check_config(config) -> None:
    """LoraConfig's `corda_config` as a CordaConfig (files hold a dict); the default one when init is
    'corda'."""
    config.corda_config = for_init(config.corda_config, CordaConfig, "corda_config", config.init_lora_weights,
                                   "corda")


register_check("corda_config", check_config)


@dataclass
class CordaEigens:
    """The r kept triplets of one layer: W C = U S V'^T with V = C^-1 V' (U: (out, r), S: (r,), V: (in,
    r))."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


# ---------------------------------------------------------------------------------------------- targets
def linear_targets(model: nn.Module, config) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the nn.Linear / Conv1D modules `config` targets, in model order (shared with
    LoRA-GA)."""
    config_view = _resolved_targets(model, config)
    for name, module in model.named_modules():
        if is_linear(module) and targeting.is_target(config_view, name):
            yield name, module


def _resolved_targets(model: nn.Module, config):
    """`config`, with target_modules=None filled from the model type's defaults (stored on config, as HF
    PEFT's LoRA-GA does) and 'all-linear' expanded on a copy."""
    if config.target_modules is None:
        config.target_modules = default_targets(LORA_TARGETS, model, "LoRA")
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == targeting.ALL_LINEAR:
        config = copy(config)
        config.target_modules = targeting.all_linear_targets(model, config.task_type, is_linear)
    return config


def _out_in(module: nn.Module) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (cols, rows) if is_conv1d(module) else (rows, cols)


def _device(model: nn.Module) -> torch.device:
    inner = getattr(model, "module", model)  # DataParallel / DeepSpeed wrappers
    return next(inner.parameters()).device


def _save(tensors: dict, path: str) -> None:
    """torch.save format (as HF PEFT's cache), written atomically: a crash never leaves a torn cache file."""
    io.atomic_write_many([(path, io.weights_writer(tensors, safe=False))])


def _load(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    """A cache file through fastpeft's checked reader (weights_only; pickled code and damage are errors)."""
    return io.load_weights_file(path, device)


def _readable(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


# ---------------------------------------------------------------------------------------------- covariances
class _CovarianceHook:
    """Forward hook adding x^T x of a layer's (max-normalised) inputs to a running sum; counts the calls."""

    def __init__(self, keep_dtype: bool) -> None:
        self.keep_dtype, self.total, self.calls = keep_dtype, None, 0

    def __call__(self, module, args, output) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])  # tokens of all samples (HF PEFT takes one sample per call)
        x = x if self.keep_dtype else x.float()
        x = x / torch.max(x).abs()  # as the reference code: scaled by |max|, not max |x|
        if not torch.isfinite(x).all():
            raise ValueError("CorDA: the calibration inputs of a target layer contain NaN or inf; check "
                             "run_model's data (or turn off use_float16_for_covariance).")
        cov = x.T @ x
        if not torch.isfinite(cov).all():
            raise ValueError("CorDA: the input covariance overflowed; set use_float16_for_covariance=False.")
        self.total = cov if self.total is None else self.total + cov
        self.calls += 1


def _collect_covariances(model, config, run_model, hooked_model) -> dict[str, torch.Tensor]:
    """{layer name: mean over run_model's forward calls of x^T x} for the targets of `model`."""
    if run_model is None:
        raise ValueError(
            "preprocess_corda needs run_model (a callable running the model on calibration data) "
            "unless corda_config.cache_file or corda_config.covariance_file already exists.")
    hooked = model if hooked_model is None else hooked_model
    keep = config.corda_config.use_float16_for_covariance
    hooks = {name: _CovarianceHook(keep) for name, _ in linear_targets(hooked, config)}
    handles = [m.register_forward_hook(hooks[n]) for n, m in linear_targets(hooked, config)]
    was_training = hooked.training
    hooked.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(was_training)
    covariances = {}
    for name, _ in linear_targets(model, config):
        hook = hooks.get(name)
        if hook is None or hook.calls == 0:
            raise ValueError(f"CorDA: target layer '{name}' never ran during run_model(); make run_model "
                             "call the model on calibration data, or leave that layer out of target_modules.")
        covariances[name] = hook.total / hook.calls
    return covariances


def _covariances(model, config, run_model, hooked_model) -> dict[str, torch.Tensor]:
    path = config.corda_config.covariance_file
    if _readable(path):
        stored = _load(path, _device(model))
        missing = [n for n, _ in linear_targets(model, config) if n not in stored]
        if missing:
            raise ValueError(f"CorDA: covariance_file {path!r} has no covariance for {missing}; delete the "
                             "file to recompute it.")
        return stored
    covariances = _collect_covariances(model, config, run_model, hooked_model)
    if path is not None:
        _save(covariances, path)
    return covariances


# ---------------------------------------------------------------------------------------------- decomposition
def _damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C', C'^-1) with C' = C + d mean(diag C) I, d doubled from 1% until C' C'^-1 is close to I."""
    eye = torch.eye(cov.shape[0], device=cov.device)
    base = torch.ones(cov.shape[0], device=cov.device) * torch.mean(torch.diag(cov))
    damp = FIRST_DAMPING
    while True:
        damped = cov + torch.diag(base * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < INVERSE_TOLERANCE:
            return damped, inverse
        damp *= 2


def decompose_layer(module: nn.Module, cov: torch.Tensor) -> CordaEigens:
    """All min(out, in) triplets of W C' (largest first), V given as C'^-1 V'."""
    weight = module.weight.data.float()
    weight = weight.T if is_conv1d(module) else weight  # (out, in)
    damped, inverse = _damped_inverse(cov.float())
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    return CordaEigens(S_WC=s, U_WC=u, V_WC=(vh @ inverse).T)


def _crop(eigens: CordaEigens, method: str, r: int, device) -> CordaEigens:
    """The r largest (ipm) or r smallest (kpm) triplets, copied so that saving writes only them."""
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=eigens.S_WC[keep].clone(), U_WC=eigens.U_WC[:, keep].clone().to(device),
                       V_WC=eigens.V_WC[:, keep].clone().to(device))


def _check_rank(name: str, module: nn.Module, r: int) -> None:
    out_f, in_f = _out_in(module)
    if r > min(out_f, in_f):
        raise ValueError(f"CorDA: r={r} for layer '{name}' exceeds min(in_features, out_features) = "
                         f"{min(out_f, in_f)} (weight {tuple(module.weight.shape)}); lower r "
                         "or set rank_pattern.")


def _computed_eigens(model, config, run_model, hooked_model) -> dict[str, CordaEigens]:
    method = config.corda_config.corda_method
    if method is None:
        raise ValueError(
            "CorDA: corda_config.corda_method ('ipm' or 'kpm') is needed when no cache_file exists.")
    targets = list(linear_targets(model, config))
    ranks = {name: targeting.pattern_value(config.rank_pattern, name, config.r) for name, _ in targets}
    for name, module in targets:
        _check_rank(name, module, ranks[name])
    covariances = _covariances(model, config, run_model, hooked_model)
    device, result = _device(model), {}
    for name, module in targets:
        if config.corda_config.verbose:
            logger.info("CorDA: decomposing %s", name)
        result[name] = _crop(decompose_layer(module, covariances[name]), method, ranks[name], device)
    return result


def _cached_eigens(model, config, path: str) -> dict[str, CordaEigens]:
    stored = _load(path, _device(model))
    result = {}
    for name, _ in linear_targets(model, config):
        keys = [f"{name}.eigens.{part}" for part in ("S_WC", "U_WC", "V_WC")]
        if any(k not in stored for k in keys):
            raise ValueError(f"CorDA: cache_file {path!r} has no decomposition for layer '{name}'; delete "
                             "the file to recompute it.")
        result[name] = CordaEigens(*(stored[k] for k in keys))
    return result


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config, run_model: Callable[[], None] | None = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Decompose every targeted linear layer of `model` for init_lora_weights='corda' (call before
    get_peft_model).

    run_model: runs the model on calibration samples (forward only); not needed when corda_config.cache_file
    or covariance_file exists. hooked_model: a different model to collect the inputs on (layers matched by
    name).
    """
    if getattr(lora_config, "corda_config", None) is None:
        raise ValueError(
            "preprocess_corda needs a LoraConfig with init_lora_weights='corda' (corda_config is set "
            "to the default CordaConfig() then) or an explicit corda_config=CordaConfig(...).")
    cache = lora_config.corda_config.cache_file
    if _readable(cache):
        eigens = _cached_eigens(model, lora_config, cache)
    else:
        eigens = _computed_eigens(model, lora_config, run_model, hooked_model)
        if cache is not None:
            _save({f"{n}.eigens.{k}": getattr(e, k) for n, e in eigens.items()
                   for k in ("S_WC", "U_WC", "V_WC")},
                  cache)
    modules = dict(model.named_modules())
    for name, found in eigens.items():
        setattr(modules[name], EIGENS_ATTR, found)


preprocess = preprocess_corda  # short alias


# ---------------------------------------------------------------------------------------------- init
def _eigens_for(layer, name: str) -> CordaEigens:
    eigens = getattr(layer.get_base_layer(), EIGENS_ATTR, None)
    if eigens is None:
        raise ValueError(
            "init_lora_weights='corda' needs preprocess_corda(model, lora_config, run_model=...) to be run "
            "on the model before get_peft_model (no decomposition found on this layer). To load a saved "
            "CorDA adapter, load it onto the saved residual base model with init_lora_weights=True in its "
            "adapter_config.json, or save a converted plain LoRA with "
            "path_initial_model_for_weight_conversion."
        )
    out_f, in_f, r = layer.out_features, layer.in_features, layer.r[name]
    expected = {"U_WC": (out_f, r), "S_WC": (r,), "V_WC": (in_f, r)}
    for part, shape in expected.items():
        tensor = getattr(eigens, part)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"CorDA: {part} has shape {tuple(tensor.shape)}, expected {shape}: run "
                             "preprocess_corda with the same model and LoraConfig (r, rank_pattern) as "
                             "get_peft_model, or rebuild corda_config.cache_file.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"CorDA: {part} contains NaN or inf; check the calibration data.")
    return eigens


@torch.no_grad()
def corda_init(layer, name: str, config=None) -> None:
    """B = U sqrt(S / s), A = sqrt(S / s) V^T from preprocess_corda's triplets; the base keeps W - s B A."""
    weight = base_weight(layer, "corda")
    check_decomposable(layer, name, weight, "corda")
    eigens = _eigens_for(layer, name)
    dtype, transposed, s = weight.dtype, is_transposed(layer), layer.scaling[name]
    root = (eigens.S_WC / s).sqrt()
    a = (eigens.V_WC.T * root.view(-1, 1)).contiguous()
    b = (eigens.U_WC * root).contiguous()
    weight_a, weight_b = layer.lora_weights(name)
    # stored in the base dtype (autocast may widen them again), the residual from the float32 factors: as HF
    # PEFT
    weight_a.data, weight_b.data = a.to(dtype), b.to(dtype)
    delta = s * b @ a
    w = weight.to(torch.float32).data - (delta.T if transposed else delta)
    layer.get_base_layer().weight.data = w.to(dtype)
    delattr(layer.get_base_layer(), EIGENS_ATTR)
