"""What transformers' own adapter loader (`PreTrainedModel.load_adapter`, transformers >= 5) asks of PEFT.

transformers reads the adapter file itself and renames each key with the `WeightRenaming` rules this module
builds (HF PEFT's `peft.utils.transformers_weight_conversion.build_peft_weight_mapping`): a file key such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` must become the model's
`model.layers.0.self_attn.q_proj.lora_A.default.weight`. Modules-to-save copies are renamed by transformers
from `AuxiliaryTrainingWrapper.adapter_state_dict_load_map` (core/auxiliary.py).
"""

from __future__ import annotations

import re

from ..registry import get_spec, registered

# the wrappers' prefix in adapter files (PeftModel.base_model.model.<user's model>)
FILE_PREFIX = r"^base_model\.model\."


def _specs(peft_config) -> list:
    """The config's method spec (all registered methods' when there is no config)."""
    if peft_config is not None and getattr(peft_config, "peft_type", None) is not None:
        return [get_spec(peft_config.peft_type)]
    return list(registered().values())


def _prefixes(peft_config) -> list[str]:
    """Parameter-name prefixes of the config's method(s)."""
    return sorted({spec.prefix for spec in _specs(peft_config) if spec.prefix})


def _bare_entries(peft_config) -> list[str]:
    """Containers stored in files under their own name (`AdapterHolder.file_bare_entries` of the methods'
    layer classes): the model key has `.<adapter>.weight` after them."""
    found = set()
    for spec in _specs(peft_config):
        family = getattr(spec.tuner_cls, "layer_family", ())
        for cls in family if isinstance(family, tuple) else (family,):
            found.update(getattr(cls, "file_bare_entries", ()))
    return sorted(found)


def build_peft_weight_mapping(weight_conversions, adapter_name: str, peft_config=None) -> list:
    """transformers' key rules for loading an adapter file into a model that holds adapter `adapter_name`.

    The model's own conversions that rename keys apply to adapter keys too; the ones that convert base tensors
    (fused MoE experts) have no adapter counterpart here and are left out, except for adapters on expert
    parameters (target_parameters), which fastpeft cannot load through transformers yet: they are refused.
    """
    from transformers.core_model_loading import WeightRenaming

    if getattr(peft_config, "target_parameters", None):
        raise NotImplementedError(
            "Loading adapters on expert parameters (target_parameters) through transformers' load_adapter is "
            "not supported by fastpeft yet: load them with fastpeft.PeftModel.from_pretrained(model, path)."
        )
    rules = [WeightRenaming(FILE_PREFIX, "")]
    for prefix in _prefixes(peft_config):
        # `...q_proj.lora_A.weight` -> `...q_proj.lora_A.<adapter>.weight`: the adapter name follows the
        # method's parameter container (lora_A, lora_magnitude_vector, ...)
        rules.append(WeightRenaming(rf"(?<![^.])({re.escape(prefix)}[^.]*)", rf"\1.{adapter_name}"))
    for entry in _bare_entries(peft_config):  # renamings chain: `...<entry>.<adapter>` -> `... .weight`
        pattern = rf"(?<![^.])({re.escape(entry)}\.{re.escape(adapter_name)})$"
        rules.append(WeightRenaming(pattern, r"\1.weight"))
    rules.extend(c for c in weight_conversions or () if isinstance(c, WeightRenaming))
    return rules
