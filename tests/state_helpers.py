"""Checks that a tensor copy or an adapter load really did its work: every key used and none missing, and the
loaded model holding the file's tensors (a loader that writes nothing must not pass)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def names_adapter(key: str, adapter_name: str = "default") -> bool:
    """A model key of adapter `adapter_name`'s own tensors (`...lora_A.default.weight`, `...ia3_l.default`)"""
    return f".{adapter_name}." in key or key.endswith(f".{adapter_name}")


def assert_all_keys_used(result, wanted=None) -> None:
    """A load's result (`missing_keys`, `unexpected_keys`): nothing unexpected and nothing missing, or, where
    `wanted` is given (a partial `load_state_dict` misses every base tensor), no missing key it accepts."""
    assert not result.unexpected_keys, f"unexpected keys: {result.unexpected_keys}"
    missing = [k for k in result.missing_keys if wanted is None or wanted(k)]
    assert not missing, f"missing keys: {missing}"


def copy_adapter(source_lib, source, target_lib, target, adapter_name: str = "default"):
    """Hand adapter `adapter_name` of `source` (a `source_lib` model) to `target` through the libraries'
    get / set_peft_model_state_dict, asserting that every key was used and none of the adapter's is missing
    (HF PEFT's result also lists the base model's tensors as missing: those are fine). Returns `target`."""
    state = source_lib.get_peft_model_state_dict(source, adapter_name=adapter_name)
    result = target_lib.set_peft_model_state_dict(target, state, adapter_name=adapter_name)
    assert_all_keys_used(result, lambda key: names_adapter(key, adapter_name))
    return target


def assert_holds_file(lib, model, folder, adapter_name: str = "default") -> None:
    """`model` (of `lib`) holds exactly the tensors of the adapter file in `folder` as adapter `adapter_name`:
    the same keys, dtypes and bits."""
    saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
    held = lib.get_peft_model_state_dict(model, adapter_name=adapter_name)
    assert sorted(held) == sorted(saved), (sorted(set(held) - set(saved)), sorted(set(saved) - set(held)))
    for key, value in saved.items():
        assert held[key].dtype == value.dtype, key
        assert torch.equal(held[key].detach().cpu(), value), f"{key} does not hold the file's values"
