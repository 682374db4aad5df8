"""Trainable tokens inside a LoRA adapter: `LoraConfig.trainable_token_indices` and `ensure_weight_tying`.

`check_lora_config` runs before the model is touched (every refusal happens there); `add_token_wrappers` runs
after LoRA's layers are in and wraps the named embeddings (and the modules tied to the input embedding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from ...core import targeting
from ...core.layer import AdapterHolder
from ...core.tuner import set_submodule
from .._shared.embeddings import input_embedding_name, tied_module_names, ties_word_embeddings
from ..trainable_tokens.config import TrainableTokensConfig, check_index_list
from ..trainable_tokens.layer import TrainableTokensWrapper
from ..trainable_tokens.model import tie_to_input_embedding

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


@dataclass
class TokenPlan:
    targets: dict[str, list[int]]  # module name (suffix) -> token ids
    tie: bool  # modules tied to the input embedding share its rows


def plan(model: nn.Module, config) -> TokenPlan:
    """HF PEFT's reading of `trainable_token_indices` (list: the input embedding; dict: name -> ids)."""
    spec = config.trainable_token_indices
    if spec is None:
        return TokenPlan({}, False)
    if isinstance(spec, dict):
        targets = {name: list(ids) for name, ids in spec.items()}
    else:
        targets = {input_embedding_name(model) or "embed_tokens": list(spec)}
    tied_flag = ties_word_embeddings(model)
    mismatch, skip = (_tied_targets(model, targets, config.ensure_weight_tying) if tied_flag
                      else (False, set()))
    return TokenPlan({k: v for k, v in targets.items() if k not in skip}, tied_flag and (
        config.ensure_weight_tying or not mismatch))


def _tied_targets(model: nn.Module, targets: dict[str, list[int]], ensure: bool) -> tuple[bool, set[str]]:
    """(indices differ between tied targets, targets to leave to the tying) for a model with tied
    embeddings."""
    if len(targets) < 2:
        return False, set()
    tied = set(tied_module_names(model))
    embedding = input_embedding_name(model) or ""
    keys = [k for k in targets if embedding.endswith(k)
            or any(t.endswith(k) or k in t.split(".") for t in tied)]
    if len(keys) < 2:
        return False, set()
    mismatch = any(targets[k] != targets[keys[0]] for k in keys[1:])
    if mismatch and ensure:
        shown = ", ".join(f"{k}: {targets[k]}" for k in keys)
        raise ValueError(
            f"ensure_weight_tying=True but the tied layers get different token indices ({shown}); give them "
            "the same indices or set ensure_weight_tying=False.")
    return mismatch, set() if mismatch else set(keys) & tied


def matches(model: nn.Module, target: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in targeting.candidate_modules(model, (AdapterHolder,)) if n.endswith(target)]


def check_lora_config(model: nn.Module, config) -> None:
    """Refuse what cannot be done, before anything is injected."""
    if config.trainable_token_indices is None:
        return
    if config.ensure_weight_tying and not ties_word_embeddings(model):
        warnings.warn("ensure_weight_tying=True but the model does not tie its word embeddings "
                      "(tie_word_embeddings=False): trainable_token_indices are not tied.", stacklevel=3)
    for target, ids in plan(model, config).targets.items():
        _check_target(model, config, target, ids)


def _check_target(model: nn.Module, config, target: str, ids: list[int]) -> None:
    check_index_list(ids, f"trainable_token_indices[{target!r}]")
    if target in (config.modules_to_save or []):
        raise ValueError(f"'{target}' is both in modules_to_save (trained whole) and in "
                         "trainable_token_indices; pick one of the two.")
    found = matches(model, target)
    if not found:
        raise ValueError(f"trainable_token_indices names '{target}', which matches no module of the model.")
    for name, module in found:
        if targeting.is_target(config, name) or isinstance(module, AdapterHolder) and not isinstance(
                module, TrainableTokensWrapper):
            raise ValueError(f"'{name}' is already adapted (target_modules / modules_to_save); it cannot "
                             "also get trainable_token_indices.")
        if isinstance(module, TrainableTokensWrapper) and module.token_adapter.tied_to is not None:
            raise ValueError(f"'{name}' shares the input embedding's trainable tokens (tied weights); give "
                             "token indices for the input embedding instead.")
        rows = getattr(module, "weight", None)
        if rows is not None and any(i >= rows.shape[0] for i in ids):
            bad = next(i for i in ids if i >= rows.shape[0])
            raise ValueError(f"Token index {bad} in trainable_token_indices is out of range for '{name}' "
                             f"with vocabulary size {rows.shape[0]} (valid ids: 0..{rows.shape[0] - 1}).")


def add_token_wrappers(tuner, model: nn.Module, adapter_name: str, config) -> None:
    """Wrap the planned embeddings for `adapter_name` (after `check_lora_config` passed)."""
    token_plan = plan(model, config)
    if not token_plan.targets:
        return
    for target, ids in token_plan.targets.items():
        tokens = TrainableTokensConfig(token_indices=ids)
        for name, module in matches(model, target):
            if isinstance(module, TrainableTokensWrapper):
                module.update(adapter_name, tokens)
            else:
                module = TrainableTokensWrapper(module, adapter_name, tokens)
                set_submodule(model, name, module)
            tuner._place_adapter(module.token_adapter, adapter_name, tuner.autocast_adapter_dtype)
    if token_plan.tie:
        tie_to_input_embedding(model, adapter_name, lambda module, source: TrainableTokensWrapper(
            module, adapter_name, tied_to=source))
    tuner._freeze_base()
    tuner._apply_adapter_state()
