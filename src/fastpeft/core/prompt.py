"""Prompt methods: they change the base model's inputs instead of wrapping its layers.

A `PromptMethod` builds one encoder per adapter and turns a forward call's keyword arguments into the base
model's: `EmbeddingPrompt` prepends virtual-token embeddings (prompt tuning, p-tuning, ...),
methods/_shared/kv_prefix.KVPrefixPrompt hands the model a pre-filled key/value cache (prefix tuning,
Cartridges). Per-task input rules live here once.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# tasks whose heads read token_type_ids (kept and padded); elsewhere they are dropped, as HF PEFT does
TOKEN_TYPE_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _first(cfg: dict, names: tuple[str, ...]):
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def fill_model_dims(config, model: nn.Module) -> None:
    """Fill num_layers / token_dim / num_attention_heads / num_transformer_submodules from the model
    config."""
    model_cfg = getattr(model, "config", None)
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
    cfg = cfg.get("text_config") or cfg
    found = {
        "num_layers": getattr(model_cfg, "num_hidden_layers", None) or _first(
            cfg, ("num_hidden_layers", "num_layers", "n_layer")),
        "token_dim": _first(cfg, ("hidden_size", "n_embd", "d_model")),
        "num_attention_heads": _first(cfg, ("num_attention_heads", "n_head", "num_heads",
                                            "encoder_attention_heads")),
    }
    for field, value in found.items():
        if getattr(config, field) is None:
            if value is None:
                raise ValueError(f"Could not read {field} from the model config; set {field} in the config.")
            setattr(config, field, value)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1


def check_virtual_tokens(config) -> None:
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}.")


def _extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)


def _pad_left(t: torch.Tensor | None, n: int, value) -> torch.Tensor | None:
    if t is None:
        return None
    pad = torch.full((t.shape[0], n), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def _drop(kwargs: dict[str, Any], key: str, why: str) -> None:
    if kwargs.get(key) is not None:
        logger.warning("%s are not supported with prompt methods (%s); ignoring them.", key, why)
    kwargs.pop(key, None)


class PromptMethod:
    """A soft-prompt method. Subclasses build the encoder and say how prompts reach the model."""

    file_keys: tuple[str, ...] = ("prompt_embeddings",)
    # forward keywords read from a call (HF PEFT's get_prompt(batch_size, task_ids) interface): see `encode`
    call_keywords: tuple[str, ...] = ("task_ids",)

    # ---------------------------------------------------------------- per method
    def prepare_config(self, config, model: nn.Module):
        check_virtual_tokens(config)
        fill_model_dims(config, model)
        return config

    def build_encoder(self, config, word_embeddings: nn.Module) -> nn.Module:
        raise NotImplementedError

    def finish(self, encoder: nn.Module, config, outputs, kwargs: dict[str, Any]):
        """Post-process the base model's outputs (`kwargs`: the caller's inputs), e.g. a method-specific
        loss."""
        return outputs

    def after_activation(self, encoder: nn.Module) -> None:
        """Hook after an adapter becomes trainable (e.g. to keep a frozen part frozen)."""

    def encode(self, encoder: nn.Module, config, batch_size: int, task_ids=None) -> torch.Tensor:
        """The prompts for a batch: (batch, rows, features)."""
        raise NotImplementedError

    def file_state(self, encoder: nn.Module, config) -> dict[str, torch.Tensor]:
        """What `adapter_model.safetensors` holds for this adapter (HF PEFT's `prompt_embeddings`)."""
        rows = torch.arange(self.rows(config), device=_device(encoder))[None]
        with torch.no_grad():
            return {"prompt_embeddings": self.encoder_output(encoder, config, rows)[0].detach().cpu()}

    def load_file_state(self, encoder: nn.Module, config, tensors: dict[str, torch.Tensor]) -> None:
        weight = encoder.embedding.weight
        value = tensors["prompt_embeddings"]
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(
                f"Adapter weight 'prompt_embeddings' has shape {tuple(value.shape)} in the file but "
                f"{tuple(weight.shape)} in the model: the adapter was made for another base model or config."
            )
        with torch.no_grad():
            weight.copy_(value.to(weight.dtype))

    def rows(self, config) -> int:
        return config.num_virtual_tokens * config.num_transformer_submodules

    def encoder_output(self, encoder: nn.Module, config, rows: torch.Tensor, task_ids=None) -> torch.Tensor:
        if config.inference_mode:  # loaded adapters hold the encoder's output directly
            return encoder.embedding(rows)
        return encoder(rows)

    # ---------------------------------------------------------------- inputs
    def transform(self, encoder: nn.Module, config, model: nn.Module, word_embeddings: nn.Module,
                  kwargs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def generate(self, encoder, config, model, word_embeddings, kwargs: dict[str, Any]):
        raise NotImplementedError(f"generate is not supported for {config.peft_type} yet.")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class EmbeddingPrompt(PromptMethod):
    """Virtual-token embeddings prepended to `inputs_embeds` (Lester et al., 2021; Liu et al., 2021)."""

    def encode(self, encoder, config, batch_size, task_ids=None):
        rows = torch.arange(self.rows(config), device=_device(encoder))[None]
        prompts = self.encoder_output(encoder, config, rows, task_ids)
        return prompts.expand(batch_size, -1, -1) if prompts.shape[0] == 1 else prompts

    def _embeds(self, kwargs, word_embeddings):
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids or inputs_embeds to the model.")
            embeds = word_embeddings(input_ids)
        return embeds

    def transform(self, encoder, config, model, word_embeddings, kwargs):
        kwargs = dict(kwargs)
        task, n = config.task_type, config.num_virtual_tokens
        task_ids = kwargs.pop("task_ids", None)
        embeds = self._embeds(kwargs, word_embeddings)
        prompts = self.encode(encoder, config, embeds.shape[0], task_ids).to(embeds.dtype)
        if task == "SEQ_2_SEQ_LM":
            prompts = prompts[:, :n]  # the encoder side; decoder inputs pass through unchanged
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n)
        _drop(kwargs, "position_ids", "positions are recomputed over the virtual tokens")
        if task in TOKEN_TYPE_TASKS:
            kwargs["token_type_ids"] = _pad_left(kwargs.get("token_type_ids"), n, 0)
        else:
            _drop(kwargs, "token_type_ids", f"task {task}")
        if task in ("CAUSAL_LM", "TOKEN_CLS"):
            # loss over the real tokens only (HF PEFT leaves TOKEN_CLS labels short, which fails in the loss)
            kwargs["labels"] = _pad_left(kwargs.get("labels"), n, -100)
        if task == "QUESTION_ANS":
            for key in ("start_positions", "end_positions"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key] + n  # the answer span moved right by the virtual tokens
        return {k: v for k, v in kwargs.items() if v is not None}

    def generate(self, encoder, config, model, word_embeddings, kwargs):
        kwargs = dict(kwargs)
        input_ids = kwargs.get("input_ids")
        if input_ids is None and kwargs.get("inputs_embeds") is None:
            raise ValueError("generate needs input_ids (or inputs_embeds).")
        # decoder-only: the caller's ids ride along with the embeddings (below)
        ride_along = config.task_type != "SEQ_2_SEQ_LM" and input_ids is not None and kwargs.get(
            "inputs_embeds") is None
        if ride_along:
            _max_length_as_new_tokens(model, kwargs, input_ids.shape[1])
        inputs = self.transform(encoder, config, model, word_embeddings,
                                {k: kwargs.pop(k, None)
                                 for k in ("input_ids", "inputs_embeds", "attention_mask",
                                           "task_ids", "token_type_ids", "position_ids")})
        if inputs.get("attention_mask") is None:
            embeds = inputs["inputs_embeds"]
            inputs["attention_mask"] = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if ride_along:
            # generate() feeds the embeddings at the first step only and continues the ids: its logits
            # processors (forced BOS, repetition rules, ...) and its result then see the caller's sequence, as
            # without a prompt
            inputs["input_ids"] = input_ids
        return model.generate(**inputs, **kwargs)


def _max_length_as_new_tokens(model: nn.Module, kwargs: dict, prompt_length: int) -> None:
    """Turn the max_length that applies (the call's, its generation_config's or the model's) into
    max_new_tokens.

    Given embeddings, generate() counts max_length from them, virtual tokens included; the caller counted it
    from the ids. A max_new_tokens that is set already wins, as in generate().
    """
    settings = kwargs.get("generation_config")
    source = settings if settings is not None else getattr(model, "generation_config", None)
    if "max_new_tokens" in kwargs or getattr(source, "max_new_tokens", None) is not None:
        return
    max_length = kwargs.pop("max_length", None)
    if max_length is None:
        max_length = getattr(source, "max_length", None)
    if max_length is None:
        return
    if settings is None:
        kwargs["max_new_tokens"] = max_length - prompt_length
    else:  # set on a copy: generate() warns when a generation_config comes with loose generation arguments
        kwargs["generation_config"] = copy.deepcopy(settings)
        kwargs["generation_config"].max_new_tokens = max_length - prompt_length


def cache_argument(model: nn.Module) -> str:
    """The forward keyword that takes a KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(
        "Key/value prefix methods (prefix tuning, Cartridges) need a model whose forward accepts a key/value "
        "cache; "
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`. Use prompt tuning or "
        "p-tuning for this model/task instead."
    )
