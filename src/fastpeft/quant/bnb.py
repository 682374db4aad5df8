"""bitsandbytes 4-bit (`Linear4bit`, nf4 / fp4, optional double quantisation) and 8-bit (`Linear8bitLt`)
layers.

bitsandbytes is imported only when a bitsandbytes object is handed in: layers and parameters are recognised by
the module their class comes from, so fastpeft imports and runs without bitsandbytes installed.

Stable API (LoRA's quantised layers and other methods use these):

- `bnb_kind(module)` / `param_kind(param)`: "4bit", "8bit" or None.
- `logical_numel(param)`: the number of weights a parameter stands for (a 4-bit byte packs two).
- `dequantize_weight(layer)`: the layer's weight as a dense (out, in) tensor.
- `quantized_param(layer, weight)` / `dequantize_param(layer, param)` / `install_weight(layer, param)`: build
  a quantised parameter in the layer's format from a dense weight, read one back, put one into the layer.
- `requantize_weight(layer, weight)`: the three above at once; returns the `QuantError` it caused.
- `snapshot(layer)` / `restore(layer, saved)`: keep a layer's quantised weight and put it back bit-exactly.
- `measure_error(target, achieved, delta)`: relative weight and output (random probe) errors.
- `dense_linear(layer, weight)`: an `nn.Linear` holding `weight` and the layer's bias (dequantised copies).
- `placement_reference(layer)`: a tensor whose device / dtype new adapter weights follow (4-bit: compute
  dtype).
- `merge_policy(...)` / `current_policy()` / `enforce(error, where)`: how lossy a merge into quantised weights
  may be (`DEFAULT_MAX_MERGE_ERROR` relative output error, `DEFAULT_MAX_ADAPTER_LOSS` of the adapter's own
  contribution) before it is refused with `LossyMergeError`.
"""

from __future__ import annotations

import contextvars
import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import LossyMergeError

logger = logging.getLogger(__name__)

_LAYER_KINDS = {"Linear4bit": "4bit", "LinearFP4": "4bit", "LinearNF4": "4bit", "Linear8bitLt": "8bit"}
_PARAM_KINDS = {"Params4bit": "4bit", "Int8Params": "8bit"}

# A merge into 4-bit / 8-bit weights that moves the layer's output by more than this (relative to the output
# of the unmerged adapter, on a random probe) is refused unless allowed. Requantising an nf4 / fp4 weight
# after adding an update costs up to its grid error (~10 %); int8 well under 1 %.
DEFAULT_MAX_MERGE_ERROR = 0.01
# ... or that loses more than this share of the adapter's own contribution (4-bit grids are coarse: an update
# much smaller than the grid step rounds away almost entirely, while the output error stays small).
DEFAULT_MAX_ADAPTER_LOSS = 0.5
PROBE_ROWS = 64


def _from_bnb(cls: type) -> bool:
    return cls.__module__.split(".", 1)[0] == "bitsandbytes"


def bnb_kind(module: nn.Module) -> str | None:
    """'4bit' for bitsandbytes `Linear4bit` (and its nf4 / fp4 subclasses), '8bit' for `Linear8bitLt`, else
    None."""
    for cls in type(module).__mro__:
        if cls.__name__ in _LAYER_KINDS and _from_bnb(cls):
            return _LAYER_KINDS[cls.__name__]
    return None


def param_kind(param: torch.Tensor) -> str | None:
    """'4bit' for a `Params4bit`, '8bit' for an `Int8Params`, else None."""
    cls = type(param)
    return _PARAM_KINDS.get(cls.__name__) if _from_bnb(cls) else None


def logical_numel(param: torch.Tensor) -> int:
    """Number of parameters `param` stands for, counted as HF PEFT does: a `Params4bit` stores two 4-bit
    values per byte of its storage dtype (numel * 2 * element size); DeepSpeed ZeRO-3 placeholders report
    `ds_numel`."""
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):
        count = param.ds_numel
    if type(param).__name__ == "Params4bit":
        count *= 2 * param.element_size()
    return count


def import_bnb():
    """The bitsandbytes module (only called for objects that come from it)."""
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - a bnb layer exists, so bnb is importable
        raise ImportError("This model has bitsandbytes layers; install bitsandbytes (pip install "
                          "bitsandbytes).") from err
    return bitsandbytes


def _require_kind(layer: nn.Module) -> str:
    kind = bnb_kind(layer)
    if kind is None:
        raise TypeError("Expected a bitsandbytes Linear4bit / Linear8bitLt layer, got "
                        f"{type(layer).__name__}.")
    return kind


# ---------------------------------------------------------------------------------------------- dequantising
def _packed_for_cpu(state) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _standard_layout(param) -> tuple[torch.Tensor, object]:
    """(data, quant state) of a 4-bit parameter in bitsandbytes' standard layout. Its AVX512-BF16 CPU kernel
    repacks weights on the first inference call (bfloat16 block scales); that layout is converted back on
    copies, leaving the layer as it is (the conversion rewrites the state it is given)."""
    if not _packed_for_cpu(param.quant_state):
        return param.data, param.quant_state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = copy.deepcopy(param.quant_state)
    state.original_nested = False  # keep the kernel's block scales as they are (not requantised again)
    data, state = _convert_weight_packed_for_cpu_inverse(param.data, state)
    if state.absmax.dim() == 2:  # the packing stores them (in / block, out); bitsandbytes 0.50 leaves them so
        state.absmax = state.absmax.T.reshape(-1).float()
    state.nested = False
    return data, state


def _source_dtype(state) -> torch.dtype:
    """The dtype a 4-bit weight was quantised from (the CPU-packed layout records it apart)."""
    return state.original_dtype if _packed_for_cpu(state) else state.dtype


def _scales_8bit(layer: nn.Module, param) -> torch.Tensor:
    """Per-row absmax scales of an int8 weight: on the parameter until the layer's first forward moves them to
    `layer.state` (a parameter not yet installed keeps its own)."""
    scb = getattr(param, "SCB", None)
    if scb is None and param is getattr(layer, "weight", None):
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if scb is None:
        raise ValueError("This Linear8bitLt has no int8 scales (SCB): it is not quantised yet (move it to a "
                         "device).")
    return scb


def dequantize_param(layer: nn.Module, param: torch.Tensor) -> torch.Tensor:
    """`param` (in `layer`'s format) as a dense (out, in) tensor: 4-bit in the dtype it was quantised from,
    8-bit in float32 (the weight itself when the layer keeps fp16 weights)."""
    bnb = import_bnb()
    if param_kind(param) == "4bit":
        data, state = _standard_layout(param)
        return bnb.functional.dequantize_4bit(data, state)
    if param_kind(param) == "8bit":
        if getattr(param, "has_fp16_weights", False) or param.dtype != torch.int8:
            return param.data
        scb = _scales_8bit(layer, param)
        return bnb.functional.int8_vectorwise_dequant(param.data, scb.to(param.device))
    raise TypeError(f"Not a bitsandbytes quantised parameter: {type(param).__name__}.")


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of bitsandbytes `layer` as a dense (out, in) tensor (dtype: see `dequantize_param`)."""
    _require_kind(layer)
    return dequantize_param(layer, layer.weight)


def dense_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a dequantised copy of `layer` gets: 4-bit: the dtype quantised from; 8-bit: float32."""
    if _require_kind(layer) == "4bit":
        return _source_dtype(layer.weight.quant_state)
    return torch.float32


def placement_reference(layer: nn.Module) -> torch.Tensor:
    """A tensor whose device and dtype adapter weights on `layer` should follow (HF PEFT's rule): an empty one
    in a 4-bit layer's compute dtype when set, else the (integer) weight itself, which fixes only the
    device."""
    compute = getattr(layer, "compute_dtype", None)
    weight = layer.weight
    return weight if compute is None else torch.empty(0, device=weight.device, dtype=compute)


# ---------------------------------------------------------------------------------------------- requantising
def quantized_param(layer: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new frozen quantised parameter in `layer`'s format (quant type, block size, double quantisation,
    storage dtype; int8 threshold state) holding dense `weight` (out, in). `layer` is not modified."""
    bnb, kind, old = import_bnb(), _require_kind(layer), layer.weight
    device = old.device
    if kind == "4bit":
        dense = weight.detach().to("cpu", _source_dtype(old.quant_state)).contiguous()
        new = bnb.nn.Params4bit(dense, requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=None)
        new = new.to(device)  # quantises
        new.module = getattr(old, "module", None)
        return new
    fp16 = bool(getattr(old, "has_fp16_weights", False))
    dense = weight.detach().to("cpu", torch.float16 if not fp16 else old.dtype).contiguous()
    return bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=fp16).to(device)  # quantises


def install_weight(layer: nn.Module, param: nn.Parameter) -> None:
    """Make `param` (from `quantized_param`) the weight of `layer`, resetting bitsandbytes' cached int8
    state."""
    kind = _require_kind(layer)
    layer.weight = param
    if kind == "4bit":
        if getattr(param, "module", None) is not None:
            param.module.quant_state = param.quant_state
        return
    layer.state.reset_grads()  # drops cached CB / SCB: the next forward takes them from the new weight


@dataclass(frozen=True)
class WeightSnapshot:
    """A layer's quantised weight, bias data and int8 state as they were (restored exactly by `restore`)."""

    weight: nn.Parameter
    bias: torch.Tensor | None
    int8_state: tuple | None


def snapshot(layer: nn.Module) -> WeightSnapshot:
    """Remember `layer`'s current weight (the object, not a copy: merges install new ones) and bias data."""
    kind, bias, state = _require_kind(layer), getattr(layer, "bias", None), getattr(layer, "state", None)
    int8 = (state.CB, state.SCB) if kind == "8bit" and state is not None else None
    return WeightSnapshot(layer.weight, None if bias is None else bias.data, int8)


def restore(layer: nn.Module, saved: WeightSnapshot) -> None:
    """Put back what `snapshot` saw: bit-exact, unlike requantising an unmerged weight."""
    layer.weight = saved.weight
    if getattr(saved.weight, "module", None) is not None:  # 4-bit: the layer keeps a copy of the quant state
        saved.weight.module.quant_state = saved.weight.quant_state
    if saved.bias is not None:
        layer.bias.data = saved.bias
    if saved.int8_state is not None:
        layer.state.reset_grads()
        layer.state.CB, layer.state.SCB = saved.int8_state


def requantize_weight(layer: nn.Module, weight: torch.Tensor) -> QuantError:
    """Quantise dense `weight` (out, in) into `layer` in place; returns the error this rounding caused."""
    param = quantized_param(layer, weight)
    error = measure_error(weight, dequantize_param(layer, param))
    install_weight(layer, param)
    return error


def dense_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """An `nn.Linear` with dense `weight` (out, in) and a copy of `layer`'s bias, in `dtype` (default
    `dense_dtype(layer)`), on the layer's device, in the layer's train / eval mode."""
    dtype = dense_dtype(layer) if dtype is None else dtype
    bias = getattr(layer, "bias", None)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.detach().to(dtype))
    out.requires_grad_(False)
    return out.train(layer.training)


# ---------------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class QuantError:
    """How far a quantised weight is from the dense weight it should hold (all relative, Frobenius norms).

    weight: ||W_q - W|| / ||W||; output: ||X (W_q - W)^T|| / ||X W^T|| on a fixed random probe X;
    adapter: ||X (W_q - W)^T|| / ||X D^T||, the error against the merged adapter's own update D (None: no D,
    or D = 0).
    """

    weight: float
    output: float
    adapter: float | None = None

    def __str__(self) -> str:
        text = f"relative output error {self.output:.3%} (weight error {self.weight:.3%}"
        if self.adapter is not None:
            text += f", {self.adapter:.1%} of the adapter's own contribution"
        return text + ")"


def _probe(in_features: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(PROBE_ROWS, in_features, generator=generator).to(device)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    den_value = float(den)
    return float(num) / den_value if den_value > 0 else (0.0 if float(num) == 0 else float("inf"))


@torch.no_grad()
def measure_error(target: torch.Tensor, achieved: torch.Tensor,
                  delta: torch.Tensor | None = None) -> QuantError:
    """Errors of `achieved` against the intended dense weight `target` (both (out, in)); `delta`: the
    adapter's update within `target`, to say how much of it was lost."""
    target, achieved = target.float(), achieved.to(target.device).float()
    diff = achieved - target
    probe = _probe(target.shape[1], target.device)
    out_err = (probe @ diff.T).norm()
    delta_out = None if delta is None else (probe @ delta.to(target.device).float().T).norm()
    adapter = None if delta_out is None or float(delta_out) == 0 else _ratio(out_err, delta_out)
    return QuantError(_ratio(diff.norm(), target.norm()), _ratio(out_err, (probe @ target.T).norm()), adapter)


# ---------------------------------------------------------------------------------------------- merge policy
@dataclass(frozen=True)
class MergePolicy:
    """When a merge into quantised weights is refused (`LossyMergeError`):

    max_error: largest relative output error it may cause (against the unmerged adapter's outputs);
    max_adapter_loss: largest share of the adapter's own contribution it may lose (a small update can round
    away entirely while the output error stays small); allow_lossy: merge anyway (the errors are still
    logged); dequantize: merged layers become dense `nn.Linear` (nothing is requantised, nothing refused).
    """

    max_error: float = DEFAULT_MAX_MERGE_ERROR
    max_adapter_loss: float = DEFAULT_MAX_ADAPTER_LOSS
    allow_lossy: bool = False
    dequantize: bool = False


_DEFAULT_POLICY = MergePolicy()
_POLICY: contextvars.ContextVar[MergePolicy | None] = contextvars.ContextVar("fastpeft_bnb_merge_policy",
                                                                             default=None)


def current_policy() -> MergePolicy:
    return _POLICY.get() or _DEFAULT_POLICY


def _checked_bound(option: str, value: float | None) -> float | None:
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"{option} must be a non-negative relative error (e.g. 0.05), got {value!r}.")
    return value


@contextmanager
def merge_policy(max_error: float | None = None, allow_lossy: bool | None = None,
                 dequantize: bool | None = None,
                 max_adapter_loss: float | None = None) -> Iterator[MergePolicy]:
    """Within the block, merges into quantised layers follow the given settings (None: keep the current
    one)."""
    changes = {"max_error": _checked_bound("max_merge_error", max_error),
               "max_adapter_loss": _checked_bound("max_adapter_loss", max_adapter_loss),
               "allow_lossy": allow_lossy, "dequantize": dequantize}
    token = _POLICY.set(replace(current_policy(), **{k: v for k, v in changes.items() if v is not None}))
    try:
        yield current_policy()
    finally:
        _POLICY.reset(token)


def _broken_bounds(error: QuantError, policy: MergePolicy) -> list[str]:
    broken = []
    if error.output > policy.max_error:
        broken.append(f"output error above max_merge_error={policy.max_error:.3%}")
    if error.adapter is not None and error.adapter > policy.max_adapter_loss:
        broken.append(f"adapter loss above max_adapter_loss={policy.max_adapter_loss:.0%}")
    return broken


def enforce(error: QuantError, where: str) -> None:
    """Log the error of a merge into quantised weights; raise `LossyMergeError` if the policy refuses it."""
    policy = current_policy()
    broken = _broken_bounds(error, policy)
    if not broken:
        logger.info("Merged into quantised %s: %s.", where, error)
        return
    if policy.allow_lossy:
        logger.warning("Lossy merge into quantised %s: %s (allowed by allow_lossy_merge=True).", where, error)
        return
    raise LossyMergeError(
        f"Merging into the quantised weights of {where} is too lossy: {error}; {' and '.join(broken)}. Pass "
        "allow_lossy_merge=True to merge anyway, raise max_merge_error / max_adapter_loss, or use "
        "merge_and_unload(dequantize=True) to merge into a dequantised full-precision copy instead."
    )
