"""Frozen random projections shared by every adapted layer of a model (VeRA, RandLoRA and PVeRA).

Both methods draw ONE pair of random matrices per model from a seeded generator (`projection_prng_key`), sized
for the largest targeted layer: each layer uses the top-left slice it needs and trains only small scaling
tensors.

Where the matrices live (same as HF PEFT, so files and state dicts line up):
- the tuner owns them as buffers `<tuner>.<a_name>.<adapter>` / `<tuner>.<b_name>.<adapter>` (persistent when
  `save_projection=True`); every adapter of a model aliases the first adapter's tensors;
- layers keep a plain (unregistered) reference to those buffer dicts, so moving the model moves them once;
- in adapter files they are `base_model.<a_name>` / `base_model.<b_name>`; RandLoRA files also carry one copy
  per adapted layer (`base_model.model.<layer>.randlora_A`), as HF PEFT writes them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from ...core.layer import AdapterLayer
from .common import (
    align_fan_in_fan_out,
    bias_file_keys,
    check_choice,
    check_positive_ints,
    fill_targets,
    refuse_second_bias_adapter,
    train_base_biases,
)
from .modules import is_conv1d, is_linear
from .tuners import StoresBuiltOnInjection

logger = logging.getLogger(__name__)

FILE_PREFIX = "base_model."


def check_projection_config(config, label: str, biases: tuple[str, ...], dropout: float) -> None:
    """Checks shared by the configs of methods with shared projections (`label`: the config's name)."""
    check_positive_ints(config, label, ("r",))
    check_choice(label, "bias", config.bias, biases)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{label} dropout must be in [0, 1), got {dropout!r}.")
    if not config.save_projection:
        logger.warning("%s.save_projection=False: the shared projections are not saved and will be redrawn "
                       "from projection_prng_key on load; set save_projection=True to make "
                       "files self-contained.", label)


class BufferDict(nn.Module):
    """Tensors registered as buffers under adapter names (non-trainable, moved with the module)."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.persistent = persistent

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def items(self):
        return self._buffers.items()


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(shape[1]) (He et al., 2015: gain sqrt(2), fan_in = columns),
    drawn from `generator`: the draws torch.nn.init.kaiming_uniform_ makes with the same generator."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a transformers Conv1D (whose weight is stored (in, out))."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return module.in_features, module.out_features


def largest_shape(modules: list[nn.Module]) -> tuple[int, int]:
    """(out, in): the largest output and input size over `modules` (each dimension separately)."""
    sizes = [in_out_features(m) for m in modules if is_linear(m)]
    if not sizes:
        raise ValueError(
            "No nn.Linear / Conv1D layer among the targets: the shared random projections are sized "
            "on them. Point target_modules at linear layers (no other layer type is supported).")
    return max(o for _, o in sizes), max(i for i, _ in sizes)


class ProjectionLayer(AdapterLayer):
    """An adapted Linear / Conv1D reading the tuner's shared projections (`projection_names`)."""

    projection_names: tuple[str, str] = ("", "")
    method_label = ""
    target_name = ""  # the module's name in the model, for error messages (set by layers that get it)

    def __init__(self, base_layer: nn.Module, projections: tuple[BufferDict, BufferDict],
                 fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.r: dict[str, int] = {}
        self.share_projections(projections)

    def share_projections(self, projections: tuple[BufferDict, BufferDict]) -> None:
        # a plain attribute, not a submodule: the tuner owns (saves and moves) the buffers
        for attr, store in zip(self.projection_names, projections):
            object.__setattr__(self, attr, store)

    def shared(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a_name, b_name = self.projection_names
        return getattr(self, a_name)[name], getattr(self, b_name)[name]

    def check_fits(self, name: str, needed: dict[str, tuple[int, int, int]]) -> None:
        """`needed`: projection -> (dimension, size needed, size available); refuse a layer they cannot
        cover."""
        where = f"layer '{self.target_name}'" if self.target_name else "this layer"
        for what, (dim, want, have) in needed.items():
            if have < want:
                raise ValueError(
                    f"{self.method_label} adapter '{name}': {what} has size {have} in dimension {dim} but "
                    f"{where} (in={self.in_features}, out={self.out_features}) needs {want}. The shared "
                    "projections were sized for the first adapter's targets; add the adapter with the "
                    "larger targets first."
                )


class ProjectionTuner(StoresBuiltOnInjection):
    """Tuner owning the shared projections; a method supplies `make_projections` and its layer classes."""

    projection_names: tuple[str, str] = ("", "")
    method_label = ""
    default_target_table: dict[str, list[str]] = {}
    per_layer_file_copies = False  # RandLoRA files hold one copy of the projections per adapted layer

    def make_projections(self, config, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ config and targets
    def prepare_config(self, config, model):
        return fill_targets(config, model, self.default_target_table, self.method_label, is_linear)

    def check_new_adapter(self, config) -> None:
        refuse_second_bias_adapter(self.peft_config, config, self.method_label)
        others = [c for c in self.peft_config.values() if c is not config]
        for other in others:
            if other.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"{self.method_label} adapters of one model share their random projections: "
                    "projection_prng_key must be the same for all of them (got "
                    f"{config.projection_prng_key}, existing adapters use {other.projection_prng_key})."
                )
            if other.save_projection != config.save_projection:
                raise ValueError(
                    f"{self.method_label} adapters of one model must all save their projections or none: got "
                    f"save_projection={config.save_projection} next to {other.save_projection}."
                )

    def _has_projections(self, adapter_name: str) -> bool:
        return (self.projection_names[0] in self._modules
                and adapter_name in self._modules[self.projection_names[0]])

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        return {"projections": self.projection_stores(),
                "fan_in_fan_out": align_fan_in_fan_out(config, base, key) if is_linear(base) else False}

    # ------------------------------------------------------------------ the shared tensors
    def projection_stores(self) -> tuple[BufferDict, BufferDict]:
        return tuple(self._modules[n] for n in self.projection_names)

    def _add_projections(self, adapter_name: str, config, targets: list[tuple[str, nn.Module]]) -> None:
        """The new adapter's projections, sized on its targets' base layers."""
        bases = [m.get_base_layer() if isinstance(m, AdapterLayer) else m for _, m in targets]
        if self.projection_names[0] not in self._modules:
            for attr in self.projection_names:
                self.add_module(attr, BufferDict(persistent=config.save_projection))
        stores = self.projection_stores()
        if len(stores[0]):  # later adapters reuse the first one's tensors (sizes checked by the layers)
            tensors = [next(iter(store.values())) for store in stores]
            self._check_rank(config, tensors[0])
        else:
            tensors = self.make_projections(config, *largest_shape(bases))
            tensors = self._placed(tensors, bases)
        for store, tensor in zip(stores, tensors):
            store[adapter_name] = tensor

    def _placed(self, tensors: list[torch.Tensor], bases: list[nn.Module]) -> list[torch.Tensor]:
        """As HF PEFT: on the base layers' device, in their dtype; fp16 / bf16 ones autocast then makes fp32
        again (the values keep the half-precision rounding, as in HF PEFT)."""
        ref = next((m.weight for m in bases if m.weight.is_floating_point()), None)
        # quantised bases only (bitsandbytes int8 / 4-bit): their device; autocast widens halves
        if ref is None:
            half = (torch.float16, torch.bfloat16)
            return [t.to(bases[0].weight.device,
                         torch.float32 if self._autocast and t.dtype in half else t.dtype)
                    for t in tensors]
        tensors = [t.to(device=ref.device, dtype=ref.dtype) for t in tensors]
        if self._autocast and ref.dtype in (torch.float16, torch.bfloat16):
            tensors = [t.to(torch.float32) for t in tensors]
        return tensors

    def projection_rank(self, projection_a: torch.Tensor) -> int:
        """The r the first projection was drawn for (its rows, unless a method draws several per rank)."""
        return projection_a.shape[0]

    def _check_rank(self, config, projection_a: torch.Tensor) -> None:
        rank = self.projection_rank(projection_a)
        if rank != config.r:
            raise ValueError(
                f"{self.method_label} adapters of one model share the projections built for the first "
                f"adapter (r={rank}); a new adapter must use the same r, got r={config.r}."
            )

    def _drop_projections(self, adapter_name: str) -> None:
        if self.projection_names[0] not in self._modules:
            return
        for store in self.projection_stores():
            if adapter_name in store:
                del store[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_projections(adapter_name)

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name: str, config) -> None:
        """bias='all' trains every bias of the base model; bias='<method>_only' those of the adapted
        layers."""
        train_base_biases(self, adapter_name, config.bias, skip=(".original_module.",))

    # ------------------------------------------------------------------ adapter files
    def _file_keys(self, adapter_name: str) -> dict[str, tuple[str, str]]:
        """{file key: (store name, layer path or "")} of the projections saved with `adapter_name`."""
        keys = {FILE_PREFIX + attr: (attr, "") for attr in self.projection_names}
        if self.per_layer_file_copies:
            for path, module in self.model.named_modules():
                if isinstance(module, ProjectionLayer) and adapter_name in module.adapter_names():
                    for attr in self.projection_names:
                        keys[f"{FILE_PREFIX}model.{path}.{attr}"] = (attr, path)
        return keys

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if not self.peft_config[adapter_name].save_projection:
            return {}
        return {key: self._modules[attr][adapter_name].detach()
                for key, (attr, _) in self._file_keys(adapter_name).items()}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        keys = self._file_keys(adapter_name)
        found = sorted(k for k in keys if k in tensors)
        if not self.peft_config[adapter_name].save_projection:
            if found:
                logger.warning("The file holds %s but save_projection=False: the projections are regenerated "
                               "from projection_prng_key instead.", found)
            return set()
        main = [FILE_PREFIX + attr for attr in self.projection_names]
        missing = [k for k in main if k not in tensors]
        if missing:
            raise ValueError(
                f"The adapter file lacks {missing}, but its config says save_projection=True. Set "
                "save_projection to False (adapter_config.json) to regenerate the projections from "
                "projection_prng_key."
            )
        self._copy_projections(adapter_name, {k: tensors[k] for k in found}, keys)
        return set(found)

    def _copy_projections(self, adapter_name: str, tensors: dict[str, torch.Tensor], keys: dict) -> None:
        for key, value in tensors.items():
            attr, _ = keys[key]
            target = self._modules[attr][adapter_name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"'{key}' has shape {tuple(value.shape)} in the file but {tuple(target.shape)} in the "
                    "model: the adapter was made for other target layers or another r. Nothing was loaded."
                )
        with torch.no_grad():  # the per-layer copies hold the same values: the model keeps one tensor
            for key in [FILE_PREFIX + attr for attr in self.projection_names]:
                target = self._modules[keys[key][0]][adapter_name]
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def seeded_normal(shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """A frozen N(0, std^2) tensor drawn on CPU from a fresh generator seeded `seed` (float32): the same
    seed gives the same values on every machine, so files may leave it out and it is drawn again."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(0.0, std, size=shape, generator=generator)
