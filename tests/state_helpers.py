"""Checks that a tensor copy or an adapter load really did its work: every key used and none missing, and the
loaded model holding the file's tensors (a loader that writes nothing must not pass); and that a failed one
left the model exactly as it was (`state_of` / `assert_same_state`)."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from safetensors.torch import load_file

import fastpeft

import models

WEIGHTS = "adapter_model.safetensors"
LORA_KW = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["head"])


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


def hf_saved(path: Path, seed: int = 1, **kw) -> Path:
    """An adapter trained away from its init in HF PEFT, saved to `path`."""
    model = peft.get_peft_model(models.make_mlp(), peft.LoraConfig(**{**LORA_KW, **kw}))
    models.perturb(model, seed, 0.3)
    model.save_pretrained(str(path))
    return path


# ------------------------------------------------------------------------------------------ model state
def state_of(model) -> dict:
    """Everything a failed load must leave as it was."""
    peft_state = None
    if isinstance(model, fastpeft.PeftModel):
        peft_state = ({k: c.to_dict() for k, c in model.peft_config.items()}, model.active_adapter)
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "attrs": sorted(vars(model)),
        "peft": peft_state,
    }


def assert_same_state(model, before: dict) -> None:
    after = state_of(model)
    for key in ("types", "grads", "training", "attrs", "peft"):
        assert after[key] == before[key], key
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
