"""`ensure_weight_tying` for LoRA: modules tied to the input embedding (an LM head) follow its adapter.

When a model ties its word embeddings and the input embedding (or a module tied to it) is in `modules_to_save`
or `target_modules`, the adapter is given to the input embedding only, as HF PEFT 0.21 does, and every tied
module shares it:
- modules_to_save: the tied module's trained copy is a bias-free linear whose weight IS the embedding copy's
  weight;
- target_modules: the tied module gets a LoRA layer whose factors share storage with the embedding's,
  transposed (A = B_emb^T, B = A_emb^T), so its delta is the embedding's delta in the linear layout. Its merge
  is a no-op: the embedding's merge already changes the one shared weight (HF PEFT 0.21 merges both and
  doubles the delta).
The saved config keeps the rewritten lists (as HF PEFT), so a reload ties again.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ...core import targeting
from ...core.auxiliary import ModulesToSaveWrapper
from ...core.layer import AdapterHolder
from ...core.tuner import set_submodule
from .._shared.embeddings import base_weight, input_embedding, input_embedding_name, ties_word_embeddings
from .variants.base import LoraVariant

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # short names HF PEFT checks the two lists for


@dataclass(frozen=True)
class TiePlan:
    kind: str  # "modules_to_save" or "target_modules"
    embedding: str  # module name of the input embedding
    tied: tuple[str, ...]  # names of the modules sharing its weight


def tied_names(model: nn.Module) -> list[str]:
    """Modules (wrapped or not) whose weight is the input embedding's; empty unless tie_word_embeddings."""
    embedding = input_embedding(model)
    if embedding is None or not ties_word_embeddings(model):
        return []
    weight, own = base_weight(embedding), input_embedding_name(model)
    return [name for name, module in targeting.candidate_modules(model, (AdapterHolder,))
            if name != own and weight is not None and base_weight(module) is weight]


def _names_embedding(entries) -> bool:
    return any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in entries or [])


def _targets_embedding(config) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return any(targeting.is_target(config, n) for n in EMBEDDING_LAYER_NAMES)
    return _names_embedding(targets)


def _moved_to_embedding(entries, embedding: str, tied: list[str]):
    """`entries` with the embedding added and, for each tied module, the first entry naming it dropped."""
    entries = list(entries or [])
    if embedding not in entries:
        entries.append(embedding)
    for key in tied:
        hit = next((m for m in entries if re.match(rf"(^|.*\.){m}($|\..*)", key)), None)
        if hit is not None:
            entries.remove(hit)
    return entries


def _warn_one_sided(model: nn.Module, config) -> None:
    """As HF PEFT: a tied embedding layer in modules_to_save / target_modules without ensure_weight_tying is
    adapted on its own; say what that means for merging (core/tying.py unties it there)."""
    if not (_names_embedding(config.modules_to_save) or _targets_embedding(config)) or not tied_names(model):
        return
    warnings.warn(
        "The model ties its word embeddings (tie_word_embeddings=True) and an embedding layer (embed_tokens "
        "/ lm_head) is in target_modules or modules_to_save, but ensure_weight_tying=False: the adapter "
        "changes that side only. Merging gives it its own copy of the weight and sets "
        "config.tie_word_embeddings=False, so a merged export keeps both weights. Set "
        "ensure_weight_tying=True to adapt both sides as one.", stacklevel=5)


def plan(model: nn.Module, config) -> TiePlan | None:
    """Rewrite `config`'s lists for tying (before injection) and say what to tie afterwards; None: nothing."""
    if not config.ensure_weight_tying:
        _warn_one_sided(model, config)
        return None
    tied = tied_names(model)
    embedding = input_embedding_name(model)
    if not tied or embedding is None:
        if config.trainable_token_indices is None:
            warnings.warn("ensure_weight_tying=True but the model has no tied word embeddings "
                          "(tie_word_embeddings=False): nothing to tie.", stacklevel=4)
        return None
    if _names_embedding(config.modules_to_save):
        config.modules_to_save = _moved_to_embedding(config.modules_to_save, embedding, tied)
        return TiePlan("modules_to_save", embedding, tuple(tied))
    if _targets_embedding(config):
        if isinstance(config.target_modules, str):
            config.target_modules = rf"(?:{config.target_modules}|^{re.escape(embedding)}$)"
        else:
            config.target_modules = set(_moved_to_embedding(config.target_modules, embedding, tied))
        return TiePlan("target_modules", embedding, tuple(tied))
    if config.trainable_token_indices is None:
        warnings.warn("ensure_weight_tying=True but neither modules_to_save nor target_modules names a tied "
                      "embedding layer (embed_tokens / lm_head): nothing to tie.", stacklevel=4)
    return None


def without_tied(targets: list, tie: TiePlan | None) -> list:
    """Targets minus the tied modules (they get the embedding's adapter in `apply`, not one of their own)."""
    if tie is None or tie.kind != "target_modules":
        return targets
    return [(n, m) for n, m in targets if n not in tie.tied]


def apply(tuner, model: nn.Module, adapter_name: str, tie: TiePlan | None) -> None:
    """After injection: make each tied module share the embedding's adapter `adapter_name`."""
    if tie is None:
        return
    source = model.get_submodule(tie.embedding)
    for name in tie.tied:
        if tie.kind == "modules_to_save":
            _share_copy(model, name, source, adapter_name)
        else:
            _share_factors(tuner, model, name, source, adapter_name)


def _share_copy(model: nn.Module, name: str, source: ModulesToSaveWrapper, adapter_name: str) -> None:
    shared = source.modules_to_save[adapter_name]
    rows, cols = shared.weight.shape
    follower = nn.Linear(cols, rows, bias=False, device="meta")
    follower.weight = shared.weight  # the same Parameter: one trained tensor, saved under both names
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSaveWrapper):
        module.update(adapter_name, copy=follower)
    else:
        set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name, copy=follower))


class TiedFollower(LoraVariant):
    """Plain LoRA on a module whose weight is the input embedding's: its merge leaves the shared weight
    alone."""

    def contribution(self, layer, name, x, result):
        x = layer.cast_input(x, layer.lora_weights(name)[0].dtype)
        return layer.lora_path(name, layer.lora_dropout[name](x))

    def merged_weight(self, layer, name):
        return layer.get_base_layer().weight.data

    def unmerged_weight(self, layer, name):
        return layer.get_base_layer().weight.data


def _share_factors(tuner, model: nn.Module, name: str, source, adapter_name: str) -> None:
    if adapter_name not in getattr(source, "lora_embedding_A", {}):
        raise ValueError(f"ensure_weight_tying: the input embedding '{source}' has no LoRA adapter "
                         f"'{adapter_name}' to share with '{name}'.")
    config = tuner.peft_config[adapter_name]
    module = model.get_submodule(name)
    kwargs = {"r": source.r[adapter_name], "lora_alpha": source.lora_alpha[adapter_name]}
    if isinstance(module, AdapterHolder):
        module.update_layer(adapter_name, config, **kwargs)
        layer = module
    else:
        layer = tuner.dispatch.resolve(module, name)(module, adapter_name, config, **kwargs)
        set_submodule(model, name, layer)
    emb_a, emb_b = source.lora_weights(adapter_name)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight = nn.Parameter(emb_b.t(), requires_grad=emb_b.requires_grad)
        layer.lora_B[adapter_name].weight = nn.Parameter(emb_a.t(), requires_grad=emb_a.requires_grad)
    layer.lora_variant[adapter_name] = TiedFollower()
    layer.__dict__.setdefault("weight_followed", {})[adapter_name] = True  # merging keeps the pair tied
    layer.train(source.training)
