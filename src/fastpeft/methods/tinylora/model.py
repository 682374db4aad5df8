"""`TinyLoraModel`: the TinyLoRA tuner. It owns the trained vectors (`tinylora_v[adapter][group]`), ties
groups of consecutive target layers to one vector (`weight_tying`), numbers the targets as HF PEFT does (the
number seeds each layer's P) and reads / writes HF PEFT's file layout: each v once as
`base_model.tinylora_v.<group>`, every layer's A and B, and its P with `save_projection`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...checkpoint.keys import write_tensor
from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from ...errors import FastPeftError
from ...integrations.transformers_defaults import LORA_TARGETS
from ...quant.bnb import bnb_kind
from .._shared.common import (
    align_fan_in_fan_out,
    bias_file_keys,
    fill_targets,
    refuse_second_bias_adapter,
    train_base_biases,
)
from .._shared.modules import is_conv1d, is_linear
from .layer import PROJECTION, TinyLoraEmbedding, TinyLoraLayer, TinyLoraLinear

logger = logging.getLogger(__name__)

VECTORS = "tinylora_v"
FILE_PREFIX = "base_model."  # file keys are the PeftModel's, the tuner being `base_model`

# HF PEFT reuses LoRA's default targets for TinyLoRA
TINYLORA_TARGETS = LORA_TARGETS


def dense_linear(module: nn.Module) -> bool:
    """nn.Linear / Conv1D with a float weight: the SVD of a bitsandbytes weight would be of its packed
    integers, which HF PEFT 0.21 does not handle either (no quantised TinyLoRA layers)."""
    return is_linear(module) and bnb_kind(module) is None


DISPATCH = DispatchChain("TinyLoRA")
DISPATCH.register(dense_linear, TinyLoraLinear)
DISPATCH.register(nn.Embedding, TinyLoraEmbedding)


class ProjectionSettingError(FastPeftError, TypeError, ValueError):
    """Adapters of one model disagree on save_projection (HF PEFT raises a TypeError there)."""


def group_of(index: int, count: int, weight_tying: float) -> str:
    """The v group of target number `index` out of `count`: round(count * (1 - weight_tying)) groups (at
    least one) of count // groups consecutive targets, the remainder joining the last group."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return str(min(index // size, groups - 1))


def new_vector(config, dtype: torch.dtype) -> nn.Parameter:
    """v (u,) in the target weight's dtype: zeros (init_weights=True, a no-op adapter), U(-b, b) from the
    global RNG ('uniform'), or zeros where HF PEFT leaves the memory unset (False)."""
    v = torch.zeros(config.u, dtype=dtype)
    if config.init_weights == "uniform":
        nn.init.uniform_(v, -config.init_v_bound, config.init_v_bound)
    return nn.Parameter(v)


class TinyLoraModel(Tuner):
    dispatch = DISPATCH

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       **options) -> None:
        if VECTORS not in self._modules:
            self.tinylora_v = nn.ModuleDict()
        self.__dict__["_injecting"] = (adapter_name, autocast_adapter_dtype)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   **options)
        except Exception:
            if adapter_name in self.tinylora_v and adapter_name not in self.peft_config:
                del self.tinylora_v[adapter_name]  # a failed injection leaves no vectors behind
            raise
        finally:
            self.__dict__["_injecting"] = None
            self.__dict__.pop("_positions", None)

    def prepare_config(self, config, model):
        return fill_targets(config, model, TINYLORA_TARGETS, "TinyLoRA", is_linear)

    def check_new_adapter(self, config) -> None:
        refuse_second_bias_adapter(self.peft_config, config, "TinyLoRA")
        others = {c.save_projection for c in self.peft_config.values() if c is not config}
        if others and others != {config.save_projection}:
            raise ProjectionSettingError(
                "TinyLoRA adapters of one model must all save their projections P or none (the layers keep "
                f"P in one buffer dict): got save_projection={config.save_projection} next to "
                f"{others.pop()}.")

    # ------------------------------------------------------------------ targets, groups and vectors
    def select_targets(self, model: nn.Module, config):
        targets = super().select_targets(model, config)
        # as HF PEFT: every module of an adaptable type whose name matches, in module order (adapter layers
        # and their insides included), is numbered; the number picks the group and seeds P
        adaptable = (nn.Linear, nn.Embedding, TinyLoraLayer)
        names = [name for name, module in model.named_modules()
                 if targeting.is_target(config, name)
                 and (isinstance(module, adaptable) or is_conv1d(module))]
        self.__dict__["_positions"] = {name: i for i, name in enumerate(names)}
        return targets

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        adapter, widen = self.__dict__["_injecting"]
        positions = self.__dict__["_positions"]
        if key not in positions:
            raise ValueError(f"TinyLoRA cannot number target '{key}' ({type(module).__name__}): only "
                             "nn.Linear, nn.Embedding and Conv1D layers are numbered and adapted.")
        index = positions[key]
        group = group_of(index, len(positions), config.weight_tying)
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if adapter not in self.tinylora_v:
            self.tinylora_v[adapter] = nn.ParameterDict()
        if group not in self.tinylora_v[adapter]:  # drawn when its group's first layer is built, as HF PEFT
            self.tinylora_v[adapter][group] = new_vector(config, base.weight.dtype)
        if is_linear(base) and not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, base, key)
        return {"tinylora_v": self.tinylora_v, "v_key": group, "layer_index": index, "widen": widen,
                "target_name": key}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if VECTORS in self._modules and adapter_name in self.tinylora_v:
            del self.tinylora_v[adapter_name]

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name: str, config) -> None:
        train_base_biases(self, adapter_name, config.bias)

    # ------------------------------------------------------------------ files
    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if VECTORS not in self._modules or adapter_name not in self.tinylora_v:
            return {}
        return {f"{FILE_PREFIX}{VECTORS}.{group}": v.detach()
                for group, v in self.tinylora_v[adapter_name].items()}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        if VECTORS not in self._modules or adapter_name not in self.tinylora_v:
            return set()
        vectors = self.tinylora_v[adapter_name]
        keys = {f"{FILE_PREFIX}{VECTORS}.{group}": v for group, v in vectors.items()}
        missing = sorted(k for k in keys if k not in tensors)
        if missing:
            raise ValueError(f"The TinyLoRA adapter file lacks {missing}, trained vectors the adapted layers "
                             "read: it was saved for other targets or weight_tying, or is damaged.")
        for key, v in keys.items():
            if tuple(tensors[key].shape) != tuple(v.shape):
                raise ValueError(f"TinyLoRA tensor '{key}' has shape {tuple(tensors[key].shape)} in the "
                                 f"file but {tuple(v.shape)} in the model: u differs from the "
                                 "adapter_config.json it was saved with.")
        with torch.no_grad():
            for key, v in keys.items():
                write_tensor(v, tensors[key])
        return set(keys) | self._ignored_projections(adapter_name, tensors)

    def _ignored_projections(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        """P tensors in a file whose config says save_projection=False: left unused (P is drawn again from
        projection_seed), as HF PEFT, with a warning."""
        if self.peft_config[adapter_name].save_projection:
            return set()
        found = {k for k in tensors if k.rsplit(".", 1)[-1] == PROJECTION}
        if found:
            logger.warning("The TinyLoRA file holds %d projection tensor(s) P but its config says "
                           "save_projection=False: P is drawn again from projection_seed instead. Set "
                           "save_projection=True to use the saved ones.", len(found))
        return found
