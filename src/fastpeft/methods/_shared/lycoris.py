"""Machinery shared by the LyCORIS-family methods (LoHa, LoKr): config fields, the adapter layer, the tuner.

Both methods build a full-size weight update dW from small factors and apply it with the base layer's own
operation (linear, conv1d or conv2d): y = base(x) + op(x, dW). A method supplies how its factors are shaped
(`create_parameters`), which factors start at zero (`ZERO_INIT`) and how dW is rebuilt (`full_delta`).

Training-time regularisers (LyCORIS, https://arxiv.org/abs/2309.14859):
- `module_dropout`: each forward in training mode skips the whole adapter with this probability;
- `rank_dropout`: each forward in training mode zeroes random output rows of dW (optionally rescaled).
Neither is ever applied to merged weights: `delta_weight` (used by merge / unmerge) is always the
deterministic dW. The random draws happen in the same order as in HF PEFT (one uniform number per adapter for
module dropout, then one per output row for rank dropout, on the CPU generator), so seeded runs agree with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...config import PeftConfig
from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .common import check_layer_selection, fill_targets, is_nn_linear, lists_to_sets

# HF PEFT 0.21.2's LoHa and LoKr default target tables are copies of LoRA's
LYCORIS_TARGETS: dict[str, list[str]] = dict(LORA_TARGETS)


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (names and defaults of HF PEFT 0.21.2)."""

    r: int = field(default=8, metadata={"size": "dim", "help": "Rank of the factors."})
    alpha: int = field(default=8, metadata={"help": "Scaling numerator: dW is multiplied by alpha / r."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "Training only: probability of zeroing each output row of dW."})
    module_dropout: float = field(
        default=0.0, metadata={
            "help": "Training only: probability of skipping the adapter in a forward pass."})
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "Conv layers with kernel > 1: factor the kernel with a CP core "
                                         "tensor (FedPara's Proposition 3) instead of flattening it."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names, dotted suffixes, a full-match regex or 'all-linear'."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: dW starts at zero (identity); False: all factors random."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt (with target name lists)."})
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the ModuleList holding the layers, e.g. 'layers' or 'h'."})
    rank_pattern: dict | None = field(
        default_factory=dict, metadata={
            "size": "dim_values", "keys": "modules",
            "help": "Module name (suffix regex) -> rank overriding r."})
    alpha_pattern: dict | None = field(
        default_factory=dict, metadata={
            "keys": "modules", "help": "Module name (suffix regex) -> alpha overriding alpha."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved."})

    # init_weights values a method accepts (LoKr adds "lycoris")
    INIT_CHOICES = (True, False)

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        self.rank_pattern = self.rank_pattern or {}
        self.alpha_pattern = self.alpha_pattern or {}
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        for key, value in [("r", self.r),
                           *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}.{key} must be a positive integer rank, got {value!r}.")
        for key, value in [("alpha", self.alpha),
                           *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}.{key} must be a number (dW is scaled by alpha / r), got {value!r}.")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}.{key} must be a probability in [0, 1], got {value!r}.")
        if not any(self.init_weights is c or self.init_weights == c for c in self.INIT_CHOICES):
            raise ValueError(
                f"{name}.init_weights must be one of {list(self.INIT_CHOICES)}, got {self.init_weights!r}.")
        check_layer_selection(self, name)


# ---------------------------------------------------------------------------------------------------- math
def cp_weight(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild of a conv kernel: core (r, r, k1, k2), out_factor (r, out), in_factor (r, in)
    -> (out, in, k1, k2)."""
    return torch.einsum("abhw,ao,bi->oihw", core, out_factor, in_factor)


@dataclass(frozen=True)
class Geometry:
    """The base weight seen by the factors: (out, in per group, *kernel); `effective`: CP-factored kernel."""

    out: int
    inp: int
    kernel: tuple[int, ...]
    effective: bool

    @property
    def flat_in(self) -> int:
        """Input size of the flattened (out, in * prod(kernel)) matrix form."""
        return self.inp * math.prod(self.kernel)

    @property
    def cp_kernel(self) -> tuple[int, int]:
        """Kernel shape of the CP core: Conv1d kernels get a trailing unit dimension (HF PEFT's layout)."""
        return (*self.kernel, 1) if len(self.kernel) == 1 else self.kernel


def geometry(base: nn.Module, use_effective_conv2d: bool) -> Geometry:
    shape = tuple(base.weight.shape)
    kernel = shape[2:]
    # 1x1 kernels gain nothing from the CP form: they always use the flat matrix
    effective = bool(use_effective_conv2d and kernel and any(k != 1 for k in kernel))
    return Geometry(out=shape[0], inp=shape[1], kernel=kernel, effective=effective)


def _conv_args(base: nn.Module) -> dict:
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation, "groups": base.groups}


# number of kernel dims -> how a full weight is applied to an input (bias stays with the base layer)
APPLY = {
    0: lambda base, x, w: F.linear(x, w),
    1: lambda base, x, w: F.conv1d(x, w, **_conv_args(base)),
    2: lambda base, x, w: F.conv2d(x, w, **_conv_args(base)),
}


# ---------------------------------------------------------------------------------------------------- layer
class LycorisLayer(AdapterLayer):
    """Adapter layer on nn.Linear / nn.Conv1d / nn.Conv2d adding op(x, dW) with dW rebuilt from factors."""

    # init_weights value -> factor attributes that start at zero (the rest get Kaiming-uniform, a=sqrt(5))
    ZERO_INIT: dict = {}
    input_cast_switchable = True  # adapter_output casts through cast_input

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, alpha: float) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_param_names:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self.update_layer(adapter_name, config, r=r, alpha=alpha)

    # ---- to implement per method
    def create_parameters(self, name: str, r: int, geo: Geometry, config) -> None:
        raise NotImplementedError

    def full_delta(self, name: str) -> torch.Tensor:
        """dW (scaled) in the factors' natural shape; reshaped to the base weight's shape by the caller."""
        raise NotImplementedError

    def scales_rank_dropout(self, config) -> bool:
        """Whether the rank-dropout mask is divided by its mean (keeps E[dW] unchanged)."""
        raise NotImplementedError

    # ---- creation
    def update_layer(self, adapter_name: str, config, r: int = 0, alpha: float = 0.0) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{type(self).__name__}: rank r must be a positive integer, got {r!r} "
                             f"(check r and rank_pattern).")
        base = self.get_base_layer()
        if len(base.weight.shape) - 2 not in APPLY:
            raise TypeError(f"{type(self).__name__} supports Linear, Conv1d and Conv2d bases, not "
                            f"{type(base).__name__}; adjust target_modules.")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = self.initial_scaling(adapter_name)
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = self.scales_rank_dropout(config)
        self.module_dropout[adapter_name] = config.module_dropout
        self.create_parameters(adapter_name, r, geometry(base, config.use_effective_conv2d), config)
        self.init_parameters(adapter_name, config.init_weights)

    def initial_scaling(self, name: str) -> float:
        return self.alpha[name] / self.r[name]

    def add_parameter(self, attr: str, name: str, *shape: int) -> None:
        getattr(self, attr)[name] = nn.Parameter(torch.empty(*shape))

    def init_parameters(self, name: str, init_weights) -> None:
        """Factors in `adapter_param_names` order (the order HF PEFT initialises them, so seeds agree)."""
        zeros = self.ZERO_INIT.get(init_weights, ())
        with torch.no_grad():
            for attr in self.adapter_param_names:
                holder = getattr(self, attr)
                if name not in holder:
                    continue
                if attr in zeros:
                    nn.init.zeros_(holder[name])
                else:
                    nn.init.kaiming_uniform_(holder[name], a=math.sqrt(5))

    # ---- weights and outputs
    def delta_weight(self, name: str) -> torch.Tensor:
        """The deterministic dW (never with rank dropout): what merge / unmerge add and subtract."""
        return self.full_delta(name).reshape(self.get_base_layer().weight.shape)

    def _rank_dropped(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand(weight.shape[0]) > self.rank_dropout[name]).to(weight.dtype)
        # every row dropped: HF PEFT divides by a zero mean (NaN dW); fastpeft keeps the all-zero dW instead
        if self.rank_dropout_scale[name] and keep.any():
            keep = keep / keep.mean()
        return weight * keep.to(weight.device).view(-1, *[1] * (weight.dim() - 1))

    def _zeros_like_output(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        probe = APPLY[base.weight.dim() - 2](base, x.to("meta"),
                                             torch.empty(base.weight.shape, dtype=x.dtype, device="meta"))
        return x.new_zeros(probe.shape)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training and not bool(torch.rand(1) > self.module_dropout[name]):
            return self._zeros_like_output(x)  # module dropout: this adapter sits out this step
        weight = self.delta_weight(name)
        if self.training and self.rank_dropout[name]:
            weight = self._rank_dropped(name, weight)
        base = self.get_base_layer()
        return APPLY[weight.dim() - 2](base, self.cast_input(x, weight.dtype), weight)


# ---------------------------------------------------------------------------------------------------- tuner
def lycoris_dispatch(method: str, linear: type, conv1d: type, conv2d: type) -> DispatchChain:
    chain = DispatchChain(method)
    chain.register(nn.Linear, linear)
    chain.register(nn.Conv1d, conv1d)
    chain.register(nn.Conv2d, conv2d)
    return chain


class LycorisTuner(Tuner):
    """Config defaults and per-module rank / alpha shared by LoHa and LoKr."""

    method_name = "LyCORIS"

    def prepare_config(self, config, model):
        return fill_targets(config, model, LYCORIS_TARGETS, self.method_name, is_nn_linear)

    def layer_kwargs(self, config, key, module):
        return {
            "r": targeting.pattern_value(config.rank_pattern, key, config.r),
            "alpha": targeting.pattern_value(config.alpha_pattern, key, config.alpha),
        }
