"""`PromptAdapters`: the tuner counterpart for prompt methods (configs, activation, encoders, files).

For prompt methods `PeftModel.base_model` is the user's model itself (as in HF PEFT); the encoders live in
`PeftModel.prompt_encoder[adapter]` and this object, kept outside the module tree, manages them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..registry import get_spec
from .auxiliary import ModulesToSaveWrapper, wrap_modules_to_save
from .seams import method_call_keywords
from .tuner import check_adapter_name


def _without_call_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` less the keywords methods read from a call (none of them reaches the base model)."""
    keywords = method_call_keywords()
    return {k: v for k, v in kwargs.items() if k not in keywords}


class PromptAdapters:
    def __init__(self, model: nn.Module, encoders: nn.ModuleDict, peft_config, adapter_name: str) -> None:
        self.model = model
        self.encoders = encoders
        self.peft_config: dict = {}
        self.active_adapter: str = adapter_name
        self.trainable_adapters: set[str] = set()
        self.disabled = False
        self.word_embeddings = model.get_input_embeddings()
        if self.word_embeddings is None:
            raise ValueError(f"{type(model).__name__} has no input embeddings; prompt methods need them.")
        self.inject_adapter(model, adapter_name, config=peft_config)

    def method(self, name: str | None = None):
        return get_spec(self.peft_config[name or self.active_adapter].peft_type).prompt_cls()

    # ------------------------------------------------------------------ adapters
    def inject_adapter(self, model: nn.Module, adapter_name: str, config=None, **_: Any) -> None:
        """Build the prompt encoder of `adapter_name`. Options for adapter layers (autocast_adapter_dtype,
        low_cpu_mem_usage) do not apply: an encoder is a few virtual-token rows, built with its values."""
        check_adapter_name(adapter_name)
        config = config if config is not None else self.peft_config[adapter_name]
        if config.task_type is None:
            raise ValueError(
                f"{config.peft_type} needs a task_type (e.g. TaskType.CAUSAL_LM) to know its inputs.")
        method = get_spec(config.peft_type).prompt_cls()
        config = method.prepare_config(config, model)
        encoder = method.build_encoder(config, self.word_embeddings).to(self.word_embeddings.weight.device)
        for param in model.parameters():
            param.requires_grad_(False)
        wrap_modules_to_save(model, adapter_name, getattr(config, "modules_to_save", None) or [])
        self.peft_config[adapter_name] = config
        self.encoders[adapter_name] = encoder
        if adapter_name == self.active_adapter and not config.inference_mode:
            self.trainable_adapters.add(adapter_name)
        self._apply_adapter_state()

    def holders(self):
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def _apply_adapter_state(self) -> None:
        trainable = [n for n in self.active_adapters if n in self.trainable_adapters]
        for name, encoder in self.encoders.items():
            for param in encoder.parameters():
                param.requires_grad_(name in trainable)
        for _, holder in self.holders():
            holder.set_adapter(self.active_adapters, trainable)
        for name in trainable:
            self.method(name).after_activation(self.encoders[name])

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if not isinstance(adapter_name, str):
            raise ValueError("Prompt methods activate one adapter at a time; pass a single adapter name.")
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Unknown adapter '{adapter_name}'; loaded adapters: {sorted(self.peft_config)}.")
        self.active_adapter = adapter_name
        self.trainable_adapters = set() if inference_mode else {adapter_name}
        self._apply_adapter_state()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter '{adapter_name}' does not exist; loaded: {sorted(self.peft_config)}.")
        del self.peft_config[adapter_name]
        del self.encoders[adapter_name]
        self.trainable_adapters.discard(adapter_name)
        for _, holder in list(self.holders()):
            holder.delete_adapter(adapter_name)
        if adapter_name == self.active_adapter and self.peft_config:
            self.active_adapter = sorted(self.peft_config)[0]
            self.trainable_adapters.add(self.active_adapter)
        self._apply_adapter_state()

    @contextmanager
    def adapters_disabled(self):
        grads = {n: p.requires_grad for n, p in self.encoders.named_parameters()}
        self.disabled = True
        for _, holder in self.holders():
            holder.enable_adapters(False)
        try:
            yield
        finally:
            self.disabled = False
            for _, holder in self.holders():
                holder.enable_adapters(True)
            self._apply_adapter_state()
            for n, p in self.encoders.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))

    # ------------------------------------------------------------------ running the model
    def model_forward(self, *args, **kwargs):
        if args:
            raise TypeError(
                "Prompt methods take keyword inputs only, e.g. model(input_ids=..., attention_mask=...).")
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("Mixed-adapter batches (adapter_names) are not supported for prompt methods.")
        if self.disabled:
            return self.model(**_without_call_keywords(kwargs))
        name = self.active_adapter
        method, encoder, config = self.method(name), self.encoders[name], self.peft_config[name]
        inputs = method.transform(encoder, config, self.model, self.word_embeddings, kwargs)
        return method.finish(encoder, config, self.model(**inputs), kwargs)

    def model_generate(self, *args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
        if self.disabled:
            return self.model.generate(**_without_call_keywords(kwargs))
        name = self.active_adapter
        return self.method(name).generate(self.encoders[name], self.peft_config[name], self.model,
                                          self.word_embeddings, kwargs)

    @contextmanager
    def mixed_batch(self, adapter_names):
        if adapter_names is not None:
            raise ValueError("Mixed-adapter batches (adapter_names) are not supported for prompt methods.")
        yield

    # ------------------------------------------------------------------ files
    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return self.method(adapter_name).file_state(self.encoders[adapter_name],
                                                    self.peft_config[adapter_name])

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        method = self.method(adapter_name)
        missing = [k for k in method.file_keys if k not in tensors]
        if missing:
            raise ValueError(
                f"The adapter file lacks {missing}, needed by {self.peft_config[adapter_name].peft_type}.")
        method.load_file_state(self.encoders[adapter_name], self.peft_config[adapter_name], tensors)
        return set(method.file_keys)

    def refuse(self, what: str):
        raise ValueError(f"{what} does not apply to prompt methods: they add no weights to the base model.")

    def merge_and_unload(self, *args, **kwargs):
        self.refuse("merge_and_unload")

    def merge_adapter(self, *args, **kwargs):
        self.refuse("merge_adapter")

    def unmerge_adapter(self, *args, **kwargs):
        self.refuse("unmerge_adapter")

    def unload(self, *args, **kwargs):
        self.refuse("unload")
