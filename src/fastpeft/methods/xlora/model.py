"""`XLoraModel`: X-LoRA's tuner, a mixture of frozen LoRA experts gated per token (arXiv:2402.07148).

Layout as HF PEFT (so parameter and file names match): `PeftModel.base_model` is this module, holding
`lora_model` (a LoraModel around the user's model with the experts as adapters "0", "1", ...) and
`internal_xlora_classifier`. Each forward runs the model twice (paper, section 3): a scaling pass without
gradients, every scaling set to `scaling_pass_value` (0: the base model), whose last hidden state the
classifier turns into scalings (batch, seq, n_layers, n_experts); then the real pass, each LoRA layer adding
its experts weighted by those scalings (layer.py). Only the classifier trains unless
`use_trainable_adapters`. Files hold the classifier (`base_model.internal_xlora_classifier.*`); the experts
are read from the folders the config names, as HF PEFT does.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...checkpoint import io
from ...core.seams import method_call_keywords
from ...core.transaction import Transaction
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .experts import build_lora_model, read_experts
from .layer import XLoraEmbeddingLayer, XLoraLayer, XLoraLinearLayer

logger = logging.getLogger(__name__)


def _check_model(model: nn.Module, config: XLoraConfig) -> None:
    model_config = getattr(model, "config", None)
    if getattr(model_config, "use_cache", False):
        raise ValueError(
            "X-LoRA needs the base model's config.use_cache = False (each step re-runs the whole sequence "
            "twice: the scaling pass and the real pass). Set model.config.use_cache = False first.")
    hidden = getattr(model_config, "hidden_size", None)
    if isinstance(hidden, int) and hidden != config.hidden_size:
        raise ValueError(
            f"XLoraConfig.hidden_size={config.hidden_size} but the base model's hidden size is {hidden}: the "
            f"classifier reads the model's last hidden state. Set hidden_size={hidden}.")


def convert_layers_to_xlora(xlora_model: XLoraModel, config: XLoraConfig, tx: Transaction
                            ) -> tuple[int, torch.device | None]:
    """Give every LoRA layer X-LoRA's forward, numbered in module order; (number of layers, device of the
    last one's weights)."""
    from ..lora.layer import Embedding

    lora_layers = {id(layer) for _, layer in xlora_model.lora_model.holders()}
    count, device = 0, None
    for module in xlora_model.model.modules():
        if id(module) not in lora_layers:
            continue
        kind = XLoraEmbeddingLayer if isinstance(module, Embedding) else XLoraLinearLayer
        layer = kind(xlora_model, module, module.forward, count, config)
        device = module.lora_weights(xlora_model.expert_names_in(module)[0])[0].device
        module.__dict__["forward"] = layer.forward
        tx.on_failure(lambda m=module: m.__dict__.pop("forward", None))
        count += 1
    return count, device


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class XLoraModel(nn.Module):
    """X-LoRA on `model`: experts from `config.adapters`, the classifier, the two-pass forward."""

    call_keywords: tuple[str, ...] = ()
    # the classifier and the expert tuner live on this object, not in the model: inject_adapter_in_model
    # would return a model without them
    injectable = False

    def __init__(self, model: nn.Module, config: XLoraConfig | dict[str, XLoraConfig],
                 adapter_name: str = "default", torch_device: str | None = None,
                 ephemeral_gpu_offload: bool = False, autocast_adapter_dtype: bool = True,
                 low_cpu_mem_usage: bool = False, state_dict: dict | None = None, **kwargs: Any) -> None:
        super().__init__()
        conf = config[adapter_name] if isinstance(config, dict) else config
        if state_dict is not None:
            raise NotImplementedError("X-LoRA is built from its expert folders; inject_adapter_in_model(..., "
                                      "state_dict=...) does not apply. Use get_peft_model(model, config).")
        if ephemeral_gpu_offload:
            raise NotImplementedError("ephemeral_gpu_offload=True is not supported by fastpeft's X-LoRA.")
        _check_model(model, conf)
        hub_kwargs, _ = io.split_hub_kwargs(kwargs)
        experts = read_experts(conf.adapters, hub_kwargs, torch_device)  # all read and checked first
        self.xlora_config = conf
        self.peft_config: dict[str, XLoraConfig] = {adapter_name: conf}
        self.active_adapter: str | list[str] = adapter_name
        self.expert_names = [expert.name for expert in experts]
        self.disabled = False
        self.__dict__.update(current_scalings=None, internal_xlora_scalings=None, _in_scaling_pass=False)
        with Transaction(model) as tx:
            had_configs = "peft_config" in model.__dict__
            tx.on_failure(lambda: had_configs or model.__dict__.pop("peft_config", None))
            self.lora_model = build_lora_model(model, experts, autocast_adapter_dtype, low_cpu_mem_usage)
            self.lora_model.set_adapter(list(self.expert_names), inference_mode=not self._experts_train())
            n_layers, device = convert_layers_to_xlora(self, conf, tx)
            self.internal_xlora_classifier = XLoraClassifier(model, conf, len(experts), n_layers, device)
        self.internal_xlora_classifier.requires_grad_(not conf.inference_mode)
        self.eval()  # as HF PEFT

    # ------------------------------------------------------------------ wiring
    @property
    def model(self) -> nn.Module:
        return self.lora_model.model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("lora_model", "model"):
                raise
            return getattr(self.lora_model.model, name)

    def expert_names_in(self, layer: nn.Module) -> list[str]:
        own = getattr(layer, layer.factors_attr)
        return [name for name in self.expert_names if name in own]

    def _experts_train(self) -> bool:
        return bool(self.xlora_config.use_trainable_adapters) and not self.xlora_config.inference_mode

    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    @property
    def trainable_adapters(self) -> set[str]:
        trains = any(p.requires_grad for p in self.internal_xlora_classifier.parameters())
        return set(self.active_adapters) if trains else set()

    def holders(self):
        return self.lora_model.holders()

    def adapter_layers(self):
        return self.lora_model.adapter_layers()

    @staticmethod
    def base_file_keys(model: nn.Module, adapter_name: str, config, modules) -> list[tuple[str, str]]:
        """What the X-LoRA file holds, under the tensors' names in the PeftModel (HF PEFT's parameter names,
        which its loader reads back as they are): the classifier (`base_model.internal_xlora_classifier.*`)
        and, when `use_trainable_adapters`, the trained experts (`base_model.lora_model.model.<path>.lora_A.0
        .weight`, ...), which the expert folders no longer match."""
        for name, module in modules:
            if isinstance(module, XLoraModel):
                keys = [k for k, _ in module.internal_xlora_classifier.named_parameters(
                    prefix=_join(name, "internal_xlora_classifier"))]
                if getattr(config, "use_trainable_adapters", False):
                    keys += module._expert_keys(_join(name, "lora_model.model"))
                return [(key, key) for key in keys]
        return []

    def _expert_keys(self, prefix: str) -> list[str]:
        return [_join(prefix, holder_name, local) for holder_name, holder in self.lora_model.holders()
                for expert in self.expert_names for local, _ in holder.adapter_tensors(expert)]

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        return set()

    # ------------------------------------------------------------------ the two passes
    def _scaling_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the user's model: run the scaling pass and set the scalings the real pass
        (this very call) uses."""
        if self._in_scaling_pass:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        classifier = self.internal_xlora_classifier
        dummy = classifier.make_dummy_scalings(input_ids=input_ids, inputs_embeds=embeds)
        pass_kwargs = {**kwargs, "output_hidden_states": True, "return_dict": True}
        self.__dict__.update(current_scalings=dummy, _in_scaling_pass=True)
        try:
            with torch.no_grad():
                output = module(*args, **pass_kwargs)
        finally:
            self.__dict__.update(current_scalings=None, _in_scaling_pass=False)
        scalings = classifier(output, input_ids=input_ids, inputs_embeds=embeds)
        self.__dict__.update(current_scalings=scalings, internal_xlora_scalings=scalings)

    @contextmanager
    def _two_passes(self):
        if self.disabled:
            yield
            return
        handle = self.model.register_forward_pre_hook(
            lambda module, args, kwargs: self._scaling_pass(module, args, kwargs), with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.__dict__["current_scalings"] = None

    @staticmethod
    def _refuse_mixed_batch(adapter_names) -> None:
        if adapter_names is not None:
            raise ValueError("X-LoRA takes no adapter_names= (mixed batches): its classifier weights the "
                             "experts for every token. Call the model without adapter_names.")

    def model_forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        self._refuse_mixed_batch(adapter_names)
        for key in method_call_keywords().intersection(kwargs):  # other methods' keywords: ignored
            del kwargs[key]
        with self._two_passes():
            return self.model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model_forward(*args, **kwargs)

    def model_generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """generate without a KV cache (as HF PEFT): every step re-runs both passes over the whole
        sequence."""
        self._refuse_mixed_batch(adapter_names)
        kwargs["use_cache"] = False
        with self._two_passes():
            return self.model.generate(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self.model_generate(*args, **kwargs)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str] | None, encoder_names: list[str] | None = None):
        self._refuse_mixed_batch(adapter_names)
        yield

    # ------------------------------------------------------------------ adapters
    def enable_adapter_layers(self) -> None:
        self.disabled = False

    def disable_adapter_layers(self) -> None:
        self.disabled = True

    @contextmanager
    def adapters_disabled(self):
        was = self.disabled
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = was

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != self.active_adapters:
            raise ValueError(f"An X-LoRA model has one adapter, {self.active_adapters[0]!r} (its experts are "
                             f"not separate adapters); got {names}.")
        self.internal_xlora_classifier.requires_grad_(not inference_mode)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **options: Any) -> None:
        if adapter_name not in self.active_adapters:
            self.peft_config.pop(adapter_name, None)
        raise ValueError("An X-LoRA model holds one X-LoRA adapter; its experts are fixed when it is built. "
                         "Build another PeftModel (get_peft_model) for another mixture.")

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError("X-LoRA's adapter cannot be deleted; call unload() for the base model.")

    def _refuse_merge(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "X-LoRA cannot be merged: its experts are weighted per token by the classifier, so no single "
            "weight update reproduces it. Keep the model unmerged (unload() gives the base model back).")

    merge_adapter = merge_and_unload = _refuse_merge

    def unmerge_adapter(self) -> None:
        """Nothing is ever merged (merging is refused)."""

    def unload(self) -> nn.Module:
        """The base model without the experts (and without X-LoRA)."""
        return self.lora_model.unload()

    # ------------------------------------------------------------------ HF PEFT's X-LoRA API
    def set_topk_lora(self, value: int | None) -> None:
        """Keep only the top-k experts per token (None: all); stored in the config."""
        n = len(self.expert_names)
        if value is not None and not 1 <= value <= n:
            raise ValueError(f"top_k_lora must be between 1 and the number of experts ({n}), or None; got "
                             f"{value}.")
        self.internal_xlora_classifier.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiplier of every expert's output (default 1); stored in the config."""
        self.internal_xlora_classifier.config.global_scaling_weight = weight

    def get_global_scaling_weight(self) -> float:
        return self.internal_xlora_classifier.config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """Value of the scalings in the scaling pass; None: 1 / number of experts."""
        self.internal_xlora_classifier._set_override_scaling_pass_value(value)

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last predicted scalings (batch, seq, n_layers, n_experts), None before the first call."""
        return self.internal_xlora_scalings

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings (the tensors are shared)."""
        return self.internal_xlora_classifier.log_scalings.copy()

    def enable_scalings_logging(self) -> None:
        self.internal_xlora_classifier.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self.internal_xlora_classifier.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self.internal_xlora_classifier.log_scalings.clear()

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: {seq_len: (positions in the log, scalings)}."""
        return self.internal_xlora_classifier._get_bucketed_scalings()


__all__ = ["XLoraLayer", "XLoraModel", "convert_layers_to_xlora"]
