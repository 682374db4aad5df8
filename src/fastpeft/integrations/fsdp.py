"""FSDP auto-wrap policy for adapter models (HF PEFT's `peft.utils.other.fsdp_auto_wrap_policy`).

transformers' Trainer gives it to accelerate's FSDP plugin for PEFT models. Each transformer block becomes one
FSDP unit (the model's `_no_split_modules` classes, or the class names in FSDP_TRANSFORMER_CLS_TO_WRAP,
comma-separated), and so does every trainable leaf module (LoRA factors, prompt encoders' tables): frozen and
trainable parameters then never share a flat parameter, which FSDP with `use_orig_params=False` requires.
"""

from __future__ import annotations

import functools
import os

from torch import nn

ENV_CLASSES = "FSDP_TRANSFORMER_CLS_TO_WRAP"


def _block_class_names(model: nn.Module) -> set[str]:
    names = os.environ.get(ENV_CLASSES)
    if names:
        return {n.strip() for n in names.split(",") if n.strip()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or ())


def _block_classes(model: nn.Module) -> set[type]:
    """The classes named by `_block_class_names` among the model's modules; a name that matches none is an
    error."""
    wanted = _block_class_names(model)
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    missing = wanted - {cls.__name__ for cls in found}
    if missing:
        raise ValueError(f"fsdp_auto_wrap_policy: no module of class {sorted(missing)} in the model (from "
                         f"{ENV_CLASSES} or the model's _no_split_modules); name classes the model has.")
    return found


def _is_trainable_leaf(module: nn.Module) -> bool:
    if next(module.children(), None) is not None:
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.requires_grad for p in params)


def fsdp_auto_wrap_policy(model: nn.Module):
    """A policy for torch's FSDP `auto_wrap_policy`: transformer blocks, and trainable leaf modules."""
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    blocks = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_block_classes(model))
    leaves = functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_trainable_leaf)
    return functools.partial(_or_policy, policies=[leaves, blocks])
