"""`OSFModel`: the OSF tuner (nn.Linear targets, per-layer effective ranks, HF PEFT's default-target table).

Merging adds the update into the base weights as HF PEFT does; unmerging, disabling a merged model and
several adapters active at once are refused (see layer.py for why)."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ...core import targeting
from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import model_type_of
from .._shared.common import fill_targets, is_nn_linear
from .layer import HIGH_BUFFERS, INIT_BUFFERS, REFUSE_UNMERGE, OsfLinear

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("OSF")
DISPATCH.register(nn.Linear, OsfLinear)

_ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
# HF PEFT 0.21's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING
OSF_TARGETS: dict[str, list[str]] = {
    **{t: list(_ATTENTION_MLP) for t in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2",
                                          "gemma3_text", "qwen2", "qwen3", "phi")},
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}


def resolve_rank(value, smaller: int):
    """HF PEFT's reading of an effective_rank for a layer whose smaller size is `smaller`: None -> half of it,
    a float in (0, 1] -> that fraction (truncated), anything else -> int(value). Not clamped: OSFModel
    refuses what does not fit instead."""
    if value is None:
        return smaller // 2
    if isinstance(value, float) and 0 < value <= 1:
        return int(smaller * value)
    return int(value)


class OSFModel(Tuner):
    """As HF PEFT: the model type's default targets, else 'all-linear' (nn.Linear layers, head left out);
    `rank_pattern` entries are searched in the module name, the first match wins."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        if config.target_modules is None:
            table = OSF_TARGETS.get(model_type_of(model))
            config.target_modules = set(table) if table is not None else targeting.ALL_LINEAR
        return fill_targets(config, model, OSF_TARGETS, "OSF", is_nn_linear)

    def _requested_rank(self, config, key: str):
        """(rank_pattern key or None, requested value) for module `key`: the first pattern found in it."""
        for pattern, value in (config.rank_pattern or {}).items():
            if re.search(pattern, key):
                return pattern, value
        return None, config.effective_rank

    @staticmethod
    def _warn_if_order_decides(config, key: str) -> None:
        """Patterns found in one name with different values: the first wins, but adapter_config.json is
        written with sorted keys (as HF PEFT), so a reloaded adapter may pick another one."""
        values = {v for p, v in (config.rank_pattern or {}).items() if re.search(p, key)}
        if len(values) > 1:
            logger.warning("OSF rank_pattern: several patterns with different ranks match '%s'; the first "
                           "in the dict wins, which can change once the config is saved (keys sorted). Make "
                           "the patterns disjoint.", key)

    def layer_kwargs(self, config, key, module):
        base = module.get_base_layer() if isinstance(module, OsfLinear) else module
        _, value = self._requested_rank(config, key)
        return {"target_name": key, "effective_rank": resolve_rank(value, min(base.weight.shape))}

    def select_targets(self, model, config):
        """The targets, every layer's effective rank checked before any SVD is taken."""
        targets = super().select_targets(model, config)
        for key, module in targets:
            base = module.get_base_layer() if isinstance(module, OsfLinear) else module
            if not isinstance(base, nn.Linear):
                continue  # refused as a type (core/target_checks.py)
            smaller = min(base.weight.shape)
            self._warn_if_order_decides(config, key)
            pattern, value = self._requested_rank(config, key)
            rank = resolve_rank(value, smaller)
            if not 0 < rank <= smaller:
                field = "effective_rank" if pattern is None else f"rank_pattern[{pattern!r}]"
                raise ValueError(
                    f"OSFConfig.{field}={value!r} gives effective_rank {rank} for layer '{key}' "
                    f"({tuple(base.weight.shape)} weight), which allows 1 to {smaller} (min(out, in)).")
        return targets

    def _place_adapter(self, layer, adapter_name: str, autocast: bool) -> None:
        """As HF PEFT: with autocast_adapter_dtype a half-precision base's adapter gets float32 factors and
        float32 frozen buffers (initial triplets, top vectors); without it, both keep the base's dtype."""
        super()._place_adapter(layer, adapter_name, autocast)
        if not autocast:
            return
        for attr in INIT_BUFFERS + HIGH_BUFFERS:
            holder = getattr(layer, attr)
            if adapter_name in holder and holder[adapter_name].dtype in (torch.float16, torch.bfloat16):
                holder[adapter_name] = holder[adapter_name].float()

    def _merged_layers(self) -> list[str]:
        return [layer.target_name for layer in self.adapter_layers() if layer.merged]

    def unmerge_adapter(self) -> None:
        merged = self._merged_layers()
        if merged:
            raise NotImplementedError(f"Layers {merged[:5]} hold merged OSF adapters. {REFUSE_UNMERGE}")

    def disable_adapter_layers(self) -> None:
        merged = self._merged_layers()
        if merged:
            raise NotImplementedError(f"Cannot disable the adapters of layers {merged[:5]}: they are merged "
                                      f"into the base weights. {REFUSE_UNMERGE}")
        super().disable_adapter_layers()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"OSF runs one adapter at a time, got {names}: HF PEFT 0.21's forward uses only the first "
                "active adapter while its merge adds them all. Activate one, or give each row its own with "
                "adapter_names=[...].")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
