"""Cartridge initialisation from a real prefill, and composition of cartridges by concatenation.

The paper's best initialisation (Eyuboglu et al., 2025, sec. 4) takes the keys and values the frozen model
computes for the first n tokens of the corpus; composing cartridges (sec. 6) concatenates their rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import io
from ...config import PeftConfig
from ...registry import get_spec
from ...types import PeftType
from .._shared.kv_prefix import KVPrefixPrompt

# what two cartridges must agree on to be concatenated: the same rows mean the same layers and heads
_COMPOSE_FIELDS = ("task_type", "token_dim", "num_layers", "num_attention_heads",
                   "num_transformer_submodules")


def _layers_of(past_key_values: Any) -> list:
    """[(key, value)] per layer from a legacy tuple / list or a transformers Cache."""
    if isinstance(past_key_values, (tuple, list)):
        return list(past_key_values)
    to_legacy = getattr(past_key_values, "to_legacy_cache", None)
    if callable(to_legacy):
        return list(to_legacy())
    if hasattr(past_key_values, "__iter__"):
        layers = list(past_key_values)
        if layers and isinstance(layers[0], (tuple, list)) and len(layers[0]) >= 2:
            return [(layer[0], layer[1]) for layer in layers]
    raise TypeError(
        f"Unsupported past_key_values of type {type(past_key_values).__name__}: pass a transformers Cache, "
        "or a tuple / list of (key, value) pairs, one per layer.")


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> torch.Tensor:
    """The first `num_virtual_tokens` positions of a one-sequence cache as (n, 2 * layers * heads *
    head_dim) rows, the layout prefix-style adapters store (per token: [layer][key|value][head][head_dim])."""
    layers = _layers_of(past_key_values)
    if not layers:
        raise ValueError("Empty past_key_values: run the model with use_cache=True on some text first.")
    key0 = layers[0][0]
    if key0.ndim != 4:
        raise ValueError(f"Expected key / value tensors of rank 4 (batch, heads, seq, head_dim), got rank "
                         f"{key0.ndim}.")
    if key0.shape[0] != 1:
        raise ValueError(f"past_key_values must come from a one-sequence prefill (batch 1), got batch "
                         f"{key0.shape[0]}.")
    heads, seq, head_dim = key0.shape[1:]
    if seq < num_virtual_tokens:
        raise ValueError(f"Need at least {num_virtual_tokens} cached tokens, got {seq}: prefill a longer "
                         "text or use fewer virtual tokens.")
    rows = []
    for index, layer in enumerate(layers):
        if len(layer) != 2:
            raise ValueError(f"Layer {index} of past_key_values holds {len(layer)} tensors, expected (key, "
                             "value): pass a decoder-only model's cache.")
        for part in layer:
            if part.shape[:2] != (1, heads) or part.shape[3] != head_dim:
                raise ValueError(f"Layer {index} of past_key_values has shape {tuple(part.shape)}; layer 0 "
                                 f"has (1, {heads}, seq, {head_dim}): inconsistent heads or head_dim.")
            if part.shape[2] < num_virtual_tokens:
                raise ValueError(f"Layer {index} caches {part.shape[2]} tokens, fewer than "
                                 f"num_virtual_tokens={num_virtual_tokens}.")
            rows.append(part[0, :, :num_virtual_tokens].transpose(0, 1))  # (n, heads, head_dim)
    return torch.stack(rows, dim=1).reshape(num_virtual_tokens, -1).contiguous()


def _kv_adapter(model, adapter_name: str | None):
    """(adapter name, its config, its prompt method) for an adapter whose rows are a key/value prefix."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError("Expected a PeftModel with a key/value prefix adapter (e.g. a CartridgeConfig), "
                         f"got {type(model).__name__}.")
    name = model.active_adapter if adapter_name is None else adapter_name
    if name not in configs:
        raise ValueError(f"Unknown adapter '{name}'; loaded adapters: {sorted(configs)}.")
    config = configs[name]
    method = get_spec(config.peft_type).prompt_cls
    if method is None or not issubclass(method, KVPrefixPrompt):
        raise ValueError(f"Adapter '{name}' must be a CARTRIDGE or PREFIX_TUNING adapter (got "
                         f"{getattr(config.peft_type, 'value', config.peft_type)}): only their rows are "
                         "keys and values.")
    return name, config, method()


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(model, *, adapter_name: str | None = None,
                                              past_key_values: Any,
                                              num_virtual_tokens: int | None = None) -> torch.Tensor:
    """Load the first positions of `past_key_values` into the adapter's rows; returns those rows."""
    name, config, method = _kv_adapter(model, adapter_name)
    n = config.num_virtual_tokens if num_virtual_tokens is None else num_virtual_tokens
    rows = prompt_embeddings_from_past_key_values(past_key_values, num_virtual_tokens=n)
    method.load_kv_rows(model.prompt_encoder[name], config, rows)
    return rows


def _prefill_ids(tokenizer, text: str, use_chat_template: bool, max_length: int | None) -> torch.Tensor:
    """The text's token ids (1, seq): as a system message when the tokenizer has a chat template."""
    def plain():
        return tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                         max_length=max_length)["input_ids"]

    if not (use_chat_template and hasattr(tokenizer, "apply_chat_template")):
        return plain()
    try:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                            add_generation_prompt=False, return_dict=False,
                                            return_tensors="pt")
    except (TypeError, ValueError):  # no chat template, or an older signature
        return plain()
    return ids if max_length is None else ids[:, :max_length]


@torch.no_grad()
def initialize_kv_prefix_from_text(model, tokenizer, *, text: str, adapter_name: str | None = None,
                                   num_virtual_tokens: int | None = None, use_chat_template: bool = True,
                                   max_length: int | None = None) -> torch.Tensor:
    """Prefill the base model (adapters off) on `text` and load its first cached positions into the adapter;
    returns the rows loaded."""
    name, _, _ = _kv_adapter(model, adapter_name)
    input_ids = _prefill_ids(tokenizer, text, use_chat_template, max_length)
    input_ids = input_ids.to(model.get_input_embeddings().weight.device)
    with model.disable_adapter():
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    return initialize_kv_prefix_from_past_key_values(model, adapter_name=name,
                                                     past_key_values=outputs.past_key_values,
                                                     num_virtual_tokens=num_virtual_tokens)


def compose_cartridge_adapters(adapter_paths: Sequence[str | Path], *, output_path: str | Path,
                               safe_serialization: bool = True) -> None:
    """Write one cartridge whose rows are the given cartridges' rows, in order (the paper's composition by
    concatenation). The result keeps the first cartridge's `num_frozen_tokens` (one attention sink)."""
    paths = [Path(p) for p in adapter_paths]
    if len(paths) < 2:
        raise ValueError(f"Need at least 2 adapters to compose, got {len(paths)}.")
    configs = [PeftConfig.from_pretrained(str(p)) for p in paths]
    for path, config in zip(paths, configs):
        if config.peft_type != PeftType.CARTRIDGE:
            raise ValueError(f"Adapter at '{path}' is not a CARTRIDGE adapter (got "
                             f"{getattr(config.peft_type, 'value', config.peft_type)}).")
    first = configs[0]
    for path, config in zip(paths[1:], configs[1:]):
        for attr in _COMPOSE_FIELDS:
            ours, theirs = getattr(first, attr, None), getattr(config, attr, None)
            if theirs != ours:
                raise ValueError(f"Incompatible CARTRIDGE configs for attribute '{attr}': '{paths[0]}' has "
                                 f"{ours!r}, '{path}' has {theirs!r}.")
    rows = [io.load_peft_weights(str(p), device="cpu")["prompt_embeddings"] for p in paths]
    composed = torch.cat(rows, dim=0)
    config = dataclasses.replace(first, num_virtual_tokens=composed.shape[0])
    name = io.SAFETENSORS_WEIGHTS_NAME if safe_serialization else io.WEIGHTS_NAME
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_many([(out / io.CONFIG_NAME, io.json_writer(config.to_json_dict())),
                          (out / name, io.weights_writer({"prompt_embeddings": composed},
                                                         safe=safe_serialization))])
