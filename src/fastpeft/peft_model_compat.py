"""`PeftModelCompat`: the parts of HF PEFT's `PeftModel` API that transformers' Trainer, TRL and user code
call beyond saving / loading / switching: the model card, prompt read-outs, adapter state, checkpointing
preparation.

A mixin of `PeftModel` (peft_model.py), method-agnostic like it: prompt methods are reached through
`PromptAdapters` and their `PromptMethod`, layer methods through the tuner.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from .checkpoint.model_card import model_card
from .core.flags import flags_of
from .core.prompt import EmbeddingPrompt

_FASTPEFT_MARK = "Saved with fastpeft"  # a line of the card body: present means our section is there
_VERSIONS_HEADING = "### Framework versions"


def _field_defaults(config) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _versions_line() -> str:
    from . import __version__

    return f"- fastpeft {__version__}"


def _add_version(text: str) -> str:
    """Put fastpeft's version under the card's framework-versions heading (added at the end when absent)."""
    line = _versions_line()
    lines = text.splitlines()
    if line in lines:
        return text
    if _VERSIONS_HEADING in lines:
        at = lines.index(_VERSIONS_HEADING) + 1
        while at < len(lines) and not lines[at].strip():
            at += 1
        lines.insert(at, line)
    else:
        lines += ["", _VERSIONS_HEADING, "", line]
    return "\n".join(lines) + "\n"


class PeftModelCompat:
    """HF PEFT `PeftModel` methods for trainers and tools (mixed into `PeftModel`)."""

    # ------------------------------------------------------------------ model card
    def model_card_text(self, adapter_name: str, config_dict: dict[str, Any], n_params: int) -> str:
        """The README.md saved next to adapter `adapter_name` (create_or_update_model_card adds its body)."""
        return model_card(config_dict, adapter_name, n_params, type(self.get_base_model()).__name__,
                          _field_defaults(self.peft_config[adapter_name]))

    def _active_card(self):
        from huggingface_hub import ModelCard

        from .checkpoint.keys import file_state

        name = self.active_adapters[0]
        tensors = file_state(self, name, list(self.named_modules()))
        return ModelCard(self.model_card_text(name, self._config_for_file(name),
                                              sum(t.numel() for t in tensors.values())))

    def _card_tags(self, ours) -> set[str]:
        tags = set(ours.data.tags or [])
        tags.update(getattr(self.get_base_model(), "model_tags", None) or [])
        base = ours.data.get("base_model")
        if base:
            tags.add(f"base_model:adapter:{base}")
        return tags

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write `output_dir/README.md` for the active adapter, or complete the card already there (e.g. the
        one transformers' Trainer writes): library_name `peft`, the adapter's tags and base model, fastpeft's
        section (method, parameters, configuration) and its version. Running it again changes nothing."""
        from huggingface_hub import ModelCard

        from .tasks import PeftModelForCausalLM

        path = os.path.join(str(output_dir), "README.md")
        ours = self._active_card()
        card = ModelCard.load(path) if os.path.exists(path) else ModelCard(str(ours))
        card.data.library_name = "peft"
        card.data.tags = sorted(self._card_tags(ours) | set(card.data.tags or []))
        if ours.data.get("base_model") and not card.data.get("base_model"):
            card.data.base_model = ours.data.base_model
        if isinstance(self, PeftModelForCausalLM) and not card.data.get("pipeline_tag"):
            card.data.pipeline_tag = "text-generation"
        text = card.text if _FASTPEFT_MARK in card.text else card.text.rstrip("\n") + "\n\n" + ours.text
        card.text = _add_version(text)
        os.makedirs(str(output_dir), exist_ok=True)
        card.save(path)

    # ------------------------------------------------------------------ adapter state
    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether a forward call runs any adapter: False inside `disable_adapter()` or with no active
        adapter."""
        return not flags_of(self).adapters_disabled and bool(self.active_adapters)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> None:
        """Make the inputs of `model` (the base model) require grad, so that reentrant checkpointing of frozen
        layers still reaches the adapters. Quantized models are left as they are (as HF PEFT: kbit preparation
        handles them)."""
        quantised = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
        if any(getattr(model, flag, False) for flag in quantised):
            return
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(
                lambda _m, _i, output: output.requires_grad_(True))
        else:
            raise TypeError(f"{type(model).__name__} has neither enable_input_require_grads nor "
                            "get_input_embeddings: cannot make its inputs require grad for gradient "
                            "checkpointing.")

    # ------------------------------------------------------------------ prompt methods
    def _prompt_parts(self, what: str, adapter_name: str):
        prompts = self.__dict__.get("_prompts")
        if prompts is None:
            raise ValueError(f"{what} applies to prompt methods (prompt / prefix / p-tuning, ...); this "
                             f"model's adapters are {self.peft_type}, which add layers instead of virtual "
                             "tokens.")
        if adapter_name not in prompts.peft_config:
            raise ValueError(f"Unknown adapter '{adapter_name}'; loaded adapters: "
                             f"{sorted(prompts.peft_config)}.")
        config = prompts.peft_config[adapter_name]
        return prompts, prompts.method(adapter_name), prompts.encoders[adapter_name], config

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The prompt rows adapter `adapter_name` stores in its file (`prompt_embeddings`), on the CPU."""
        prompts, *_ = self._prompt_parts("get_prompt_embedding_to_save", adapter_name)
        return prompts.extra_file_state(adapter_name)["prompt_embeddings"]

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None,
                   max_cache_len: int | None = None):
        """The active adapter's virtual tokens for a batch: embeddings (batch, rows, dim) for embedding
        prompts, the pre-filled key/value cache the base model takes for cache prompts (prefix tuning)."""
        if max_cache_len is not None:
            raise NotImplementedError(
                "get_prompt(max_cache_len=...) sized HybridCache prefixes for transformers < 4.56; fastpeft "
                "builds a DynamicCache, which needs no length. Leave max_cache_len=None."
            )
        prompts, method, encoder, config = self._prompt_parts("get_prompt", self.active_adapter)
        if isinstance(method, EmbeddingPrompt):
            return method.encode(encoder, config, batch_size, task_ids)
        # cache prompts: the cache their input transform builds for a batch of `batch_size` one-token rows
        ids = torch.zeros((batch_size, 1), dtype=torch.long, device=prompts.word_embeddings.weight.device)
        inputs = method.transform(encoder, config, prompts.model, prompts.word_embeddings, {"input_ids": ids})
        return next(inputs[k] for k in ("cache", "past_key_values") if k in inputs)
