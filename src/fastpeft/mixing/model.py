"""`PeftMixedModel`: a user's model with adapters of several methods active together (HF PEFT's
`peft.mixed_model`). `base_model` is the `MixedModel` tuner (mixing/tuner.py), `base_model.model` the user's
model, so file keys keep HF PEFT's `base_model.model.` prefix.

Beyond HF PEFT 0.21 (which refuses to save a mixed model), `save_pretrained` writes each adapter as the file
of its own method, which HF PEFT's `PeftModel` / `PeftMixedModel.load_adapter` load unchanged.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..checkpoint import io, loading, validate
from ..checkpoint.config_values import check_config_for_model
from ..checkpoint.keys import file_state
from ..config import PeftConfig
from ..core import checks
from ..core.names import check_adapter_name
from ..core.transaction import Transaction
from ..peft_model import PeftModel
from .tuner import MixedModel, check_mixable, file_keys_for_save

DUMMY_MODEL_CONFIG = {"model_type": "custom"}  # as HF PEFT, for models without a transformers config


def _prepare_for_checkpointing(model: nn.Module) -> None:
    """With activation checkpointing on, frozen embeddings would starve the adapters of gradients."""
    if not getattr(model, "is_gradient_checkpointing", True):
        return
    quantised = any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit",
                                                             "is_quantized"))
    if not quantised and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


class PeftMixedModel(nn.Module):
    """`model` with adapters of different (mixable) methods; several may be active at once
    (`set_adapter([...])`). They apply in the order they were added, not the order given to set_adapter."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        check_adapter_name(adapter_name)
        check_mixable(peft_config)
        _prepare_for_checkpointing(model)
        self.modules_to_save: set[str] | None = None
        # as HF PEFT: the first adapter keeps the base's dtype (only add_adapter upcasts half-precision ones)
        self.base_model = MixedModel(model, {adapter_name: peft_config}, adapter_name,
                                     autocast_adapter_dtype=False)
        self.set_modules_to_save(peft_config, adapter_name)
        self.config = getattr(model, "config", DUMMY_MODEL_CONFIG)
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1  # as HF PEFT: no simulated tensor-parallel slicing

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ state
    @property
    def tuner(self) -> MixedModel:
        return self.base_model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    get_nb_trainable_parameters = PeftModel.get_nb_trainable_parameters
    print_trainable_parameters = PeftModel.print_trainable_parameters
    _config_for_file = PeftModel._config_for_file

    def get_layer_status(self):
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self):
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, **kwargs: Any):
        return self.base_model.model_forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self.base_model.model_generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self):
        """The base model alone inside the block; adapters and requires_grad flags come back on exit."""
        with self.base_model.adapters_disabled():
            yield

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an untrained, inactive adapter of any mixable method (activate it with set_adapter)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        check_mixable(peft_config)
        with Transaction(self.get_base_model()):
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(self.get_base_model(), adapter_name,
                                           low_cpu_mem_usage=low_cpu_mem_usage,
                                           autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_modules_to_save(peft_config, adapter_name)

    def set_modules_to_save(self, peft_config: PeftConfig, adapter_name: str) -> None:
        """Record the config's modules_to_save (the injection already wrapped them)."""
        names = getattr(peft_config, "modules_to_save", None)
        if names is None:
            return
        self.modules_to_save = set(names) | (self.modules_to_save or set())

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate the named adapters together; they train unless `inference_mode`."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(
                f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.delete_adapter(adapter_name)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.base_model.unload(*args, **kwargs)

    def create_or_update_model_card(self, output_dir: str):
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__} (yet).")

    # ------------------------------------------------------------------ files
    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
        """Load a trained adapter of any mixable method (a new name is added first, inactive), all or
        nothing. As HF PEFT, the active adapters are activated again afterwards."""
        result = PeftModel.load_adapter(self, model_id, adapter_name, *args, **kwargs)
        self.set_adapter(self.active_adapters)
        return result

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Each adapter as the files of its own method (`adapter_config.json` + weights); adapters other
        than 'default' go to `<dir>/<name>/`."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; loaded: {sorted(self.peft_config)}.")
        if not is_main_process:
            return
        modules = list(self.named_modules())
        for name in names:
            out_dir = str(save_directory) if name == "default" else os.path.join(save_directory, name)
            tensors = file_keys_for_save(self, file_state(self, name, modules))
            checks.refuse_empty_tensors(tensors, name)
            weights = io.SAFETENSORS_WEIGHTS_NAME if safe_serialization else io.WEIGHTS_NAME
            validate.check_write_target(save_directory, os.path.join(out_dir, weights))
            io.atomic_write_many([
                (os.path.join(out_dir, weights), io.weights_writer(tensors, safe_serialization, None)),
                (os.path.join(out_dir, io.CONFIG_NAME), io.json_writer(self._config_for_file(name)))])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        **kwargs: Any) -> PeftMixedModel:
        """A PeftMixedModel over `model` with the adapter in `model_id` (frozen unless `is_trainable`); add
        more with load_adapter. A failure leaves `model` as it was."""
        hub_kwargs, _ = io.split_hub_kwargs(kwargs)
        config = PeftConfig.given_or_saved(config, model_id, **hub_kwargs)
        check_mixable(config)
        config.inference_mode = not is_trainable
        with loading.all_or_nothing(model, model_id, hub_kwargs):
            check_config_for_model(config, model, model_id)
            mixed = cls(model, config, adapter_name)
            mixed.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        return mixed
