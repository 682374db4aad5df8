"""`PeftModel`: a user's model plus adapters, with HF PEFT's methods (save / load / switch / merge).

Method-agnostic: everything method-specific sits behind `self.tuner` (a layer method's Tuner, or
PromptAdapters). For layer methods `base_model` is the tuner and `base_model.model` the user's model (hence
the `base_model.model.` key prefix); for prompt methods `base_model` is the user's model itself, as in HF
PEFT.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import types
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .checkpoint import fingerprint, hub, io, loading, validate
from .checkpoint.config_values import check_config_for_model
from .checkpoint.keys import file_state, set_peft_model_state_dict
from .config import PeftConfig, declared
from .core import checks, grad_flags, module_walk
from .core.flags import copy_flags, flags_of
from .core.layer import AdapterHolder
from .core.names import known_adapters
from .core.prompt_adapters import PromptAdapters
from .core.seams import AdapterManager, method_call_keywords
from .core.transaction import Transaction
from .core.tuner import check_adapter_name
from .integrations.transformers import enable_trainer_support
from .peft_model_compat import PeftModelCompat
from .registry import get_spec

logger = logging.getLogger(__name__)


def has_adapters(model: nn.Module) -> bool:
    return isinstance(model, PeftModel) or any(isinstance(m, AdapterHolder) for m in model.modules())


def refuse_second_wrap(model: nn.Module) -> None:
    if has_adapters(model):
        raise ValueError(
            "This model already has adapters. To add another one use peft_model.add_adapter(name, config) "
            "(or load_adapter(path, adapter_name=name)); to start over, call unload() or merge_and_unload() "
            "first."
        )


def _expose_base_signature(peft_model: PeftModel) -> None:
    """Give this instance's generic `forward` the base model's signature (plus `adapter_names`).

    transformers' Trainer drops dataset columns that `forward` does not name; `(*args, **kwargs)` names none.
    A bound method of a per-instance function keeps `deepcopy` working (it rebinds to the copy).
    """
    try:
        sig = inspect.signature(peft_model.get_base_model().forward)
    except (TypeError, ValueError):
        return
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()]
    if "adapter_names" not in sig.parameters:
        params.append(inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
    ordered = sorted(params, key=lambda p: p.kind)  # stable: keeps Python's parameter-kind order valid

    def forward(self, *args, **kwargs):
        return PeftModel.forward(self, *args, **kwargs)

    forward.__signature__ = sig.replace(parameters=ordered)
    peft_model.__dict__["forward"] = types.MethodType(forward, peft_model)


def refuse_ephemeral_gpu_offload(enabled: bool) -> None:
    """HF PEFT's `ephemeral_gpu_offload` (DoRA norms of CPU-offloaded layers computed on the GPU) is not
    implemented: refuse it rather than accept and ignore it."""
    if enabled:
        raise NotImplementedError(
            "ephemeral_gpu_offload=True is not supported by fastpeft yet: weight norms of offloaded layers "
            "are computed on the device that holds the base weights. Load with ephemeral_gpu_offload=False "
            "(the default)."
        )


def _check_trainable_load(config: PeftConfig, is_trainable: bool) -> None:
    if is_trainable and config.is_prompt_learning:
        raise ValueError(
            f"Saved {config.peft_type} adapters load for inference only, as in HF PEFT (for prompt "
            "encoders the file holds the encoder's output, not its trainable parts), so is_trainable=True is "
            "refused. Load it for inference, or train a new adapter."
        )


class PeftModel(PeftModelCompat, nn.Module):
    """Wraps `model` with the adapter described by `peft_config` under the name `adapter_name`."""

    # module names trained whole for this task (classifier heads); extended into config.modules_to_save
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        check_adapter_name(adapter_name)
        spec = get_spec(peft_config.peft_type)
        self._add_task_modules_to_save(peft_config)
        checks.check_new_heads(model, peft_config)  # random new heads not in modules_to_save
        self.peft_type = peft_config.peft_type
        # as HF PEFT: keywords a forward takes besides the base model's (its set is the same for every method)
        self.special_peft_forward_args = {"adapter_names", *method_call_keywords()}
        self._is_prompt_learning = peft_config.is_prompt_learning
        if spec.prompt_cls is not None:
            # as HF PEFT: base_model is the user's model, encoders sit in prompt_encoder[adapter]
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
            self.__dict__["_prompts"] = PromptAdapters(model, self.prompt_encoder, peft_config, adapter_name)
        else:
            self.base_model = spec.tuner_cls(model, {adapter_name: peft_config}, adapter_name,
                                             low_cpu_mem_usage=low_cpu_mem_usage,
                                             autocast_adapter_dtype=autocast_adapter_dtype)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5 only has the older name
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if type(self).forward is PeftModel.forward:
            _expose_base_signature(self)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            # frozen embeddings + reentrant checkpointing would otherwise give the adapters no gradient
            model.enable_input_require_grads()
        # transformers' Trainer / TRL: save and resume adapters (integrations/transformers.py)
        enable_trainer_support()
        checks.follow_base_mode(self)  # an eval model gets eval-mode adapters

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            prompts = self.__dict__.get("_prompts")
            if prompts is not None and hasattr(prompts, name):  # e.g. merge_and_unload -> a clear refusal
                return getattr(prompts, name)
            return getattr(self.base_model, name)

    def _add_task_modules_to_save(self, config: PeftConfig) -> None:
        if not self.task_modules_to_save or not hasattr(config, "modules_to_save"):
            return
        if config.modules_to_save is None:
            config.modules_to_save = list(self.task_modules_to_save)
        else:
            config.modules_to_save = list(config.modules_to_save) + [
                m for m in self.task_modules_to_save if m not in config.modules_to_save]

    # ------------------------------------------------------------------ state
    @property
    def tuner(self) -> AdapterManager:
        """What manages the adapters: the Tuner (layer methods) or PromptAdapters (prompt methods)."""
        return self.__dict__.get("_prompts") or self.base_model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.tuner.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.tuner.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.tuner.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.tuner.model

    def _replicate_for_data_parallel(self):
        """nn.DataParallel's replicas copy `__dict__`: rebind the per-instance `forward`
        (`_expose_base_signature`) to the replica, else every replica would run the original module with the
        first device's weights."""
        replica = super()._replicate_for_data_parallel()
        bound = self.__dict__.get("forward")
        if isinstance(bound, types.MethodType) and bound.__self__ is self:
            replica.__dict__["forward"] = types.MethodType(bound.__func__, replica)
        copy_flags(self, replica)
        return replica

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .quant.bnb import logical_numel  # 4-bit bitsandbytes params pack two weights per byte

        trainable = total = 0
        for param in self.parameters():
            count = logical_numel(param)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
        if trainable == 0:
            print(checks.NO_TRAINABLE_NOTICE)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new (untrained, inactive) adapter. `autocast_adapter_dtype=False` keeps its weights in the
        dtype of the layers they sit on (default: float16 / bfloat16 adapter weights are made float32, as HF
        PEFT)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter '{adapter_name}' already exists; delete_adapter it first or pick a "
                             "new name.")
        if get_spec(peft_config.peft_type) is not get_spec(self.peft_type):  # one method per PeftModel
            raise ValueError(
                f"Cannot add a {peft_config.peft_type} adapter to a {self.peft_type} model: one PeftModel "
                "holds adapters of a single method type."
            )
        self._add_task_modules_to_save(peft_config)
        # a method's inject_adapter may add steps after the generic ones
        with Transaction(self.get_base_model()):
            self.tuner.peft_config[adapter_name] = peft_config
            self.tuner.inject_adapter(self.get_base_model(), adapter_name,
                                      low_cpu_mem_usage=low_cpu_mem_usage,
                                      autocast_adapter_dtype=autocast_adapter_dtype)
        checks.follow_base_mode(self)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.tuner.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch training on or off for the named adapters' parameters (modules_to_save copies included),
        until the next `set_adapter`. Refused for prompt learning, as HF PEFT."""
        if self.active_peft_config.is_prompt_learning:
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods like "
                            f"{self.active_peft_config.peft_type}: their adapters train when active.")
        setter = getattr(self.tuner, "set_requires_grad", None)
        if setter is not None:
            setter(adapter_names, requires_grad)
            return
        # a tuner without its own (X-LoRA's): the flags of its holders directly
        names = known_adapters(self.peft_config, adapter_names)
        grad_flags.apply_overrides([h for _, h in self.tuner.holders()], dict.fromkeys(names, requires_grad))

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    def get_layer_status(self):
        from .model_utils import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        from .model_utils import get_model_status

        return get_model_status(self)

    def delete_adapter(self, adapter_name: str) -> None:
        self.tuner.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self):
        """Run the base model without adapters inside the `with` block. On exit, exception or not, the
        adapters are enabled again and every parameter's requires_grad is what it was before (adapters the
        user froze, base weights the user unfroze); a nested block leaves the adapters disabled until the
        outermost one ends."""
        model_flags = flags_of(self)
        if model_flags.adapters_disabled:
            yield
            return
        grads = [(param, param.requires_grad) for param in self.parameters()]
        model_flags.adapters_disabled = True
        try:
            with self.tuner.adapters_disabled():
                yield
        finally:
            model_flags.adapters_disabled = False
            for param, flag in grads:
                param.requires_grad_(flag)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any):
        watch = checks.before_training_forward(self)  # 0 trainable parameters; checkpointing input grads
        try:
            output = self.tuner.model_forward(*args, **kwargs)
        except BaseException:
            if watch:
                checks.stop_watching(self)
            raise
        return checks.check_output_graph(self, output) if watch else output

    def generate(self, *args: Any, **kwargs: Any):
        return self.tuner.model_generate(*args, **kwargs)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None,
                        save_embedding_layers: str | bool = "auto", is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs: Any) -> None:
        """Write each adapter's `adapter_config.json` + weights; non-default adapters go to
        `<dir>/<name>/`."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder.")
        convert = getattr(self.tuner, "converted_file_state", None)  # layer methods' Tuner only
        if path_initial_model_for_weight_conversion is not None and convert is None:
            raise NotImplementedError("path_initial_model_for_weight_conversion does not apply to "
                                      f"{self.peft_type}.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; loaded: {sorted(self.peft_config)}.")
        if not is_main_process:
            return
        modules = list(self.named_modules())  # one walk for every adapter's tensors and fingerprint
        for name in names:
            check_adapter_name(name)
            out_dir = str(save_directory) if name == "default" else os.path.join(save_directory, name)
            # Trainer passes the gathered full state dict here under FSDP / DeepSpeed (as HF PEFT accepts)
            tensors = file_state(self, name, modules, state_dict=kwargs.get("state_dict"),
                                 save_embedding_layers=save_embedding_layers)
            checks.refuse_empty_tensors(tensors, name)  # ZeRO-3 / FSDP placeholders
            weights = io.SAFETENSORS_WEIGHTS_NAME if safe_serialization else io.WEIGHTS_NAME
            config_dict = self._config_for_file(name)
            if path_initial_model_for_weight_conversion is not None:
                tensors, config_dict = convert(name, tensors, config_dict,
                                               path_initial_model_for_weight_conversion)
            # no symlinked folder out
            validate.check_write_target(save_directory, os.path.join(out_dir, weights))
            converted = path_initial_model_for_weight_conversion is not None
            # base fingerprint
            metadata = fingerprint.file_metadata(self, name, converted=converted, modules=modules,
                                                 file_keys=tensors.keys())
            writer = io.weights_writer(tensors, safe_serialization, metadata)
            jobs = [(os.path.join(out_dir, weights), writer),
                    (os.path.join(out_dir, io.CONFIG_NAME), io.json_writer(config_dict))]
            card = os.path.join(out_dir, "README.md")
            if not os.path.exists(card):  # never overwrite a card the user wrote
                text = self.model_card_text(name, config_dict, sum(t.numel() for t in tensors.values()))
                jobs.append((card, io.text_writer(text)))
            io.atomic_write_many(jobs)

    def _config_for_file(self, name: str) -> dict[str, Any]:
        config = copy.copy(self.peft_config[name])
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None) or None
        config.inference_mode = True
        data = config.to_json_dict()
        if config.task_type is None:
            base_cls = type(self.get_base_model())
            data["auto_mapping"] = {"base_model_class": base_cls.__name__,
                                    "parent_library": base_cls.__module__}
        return data

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict | None = None,
                        **kwargs: Any) -> PeftModel:
        """Load an adapter folder (or Hub repo id) onto `model`. Frozen unless `is_trainable=True`."""
        from .tasks import TASK_CLASSES

        check_adapter_name(adapter_name)
        refuse_second_wrap(model)
        hub_kwargs, _ = io.split_hub_kwargs(kwargs)
        config = PeftConfig.given_or_saved(config, model_id, **hub_kwargs)
        for name in declared(config, "load_kwarg"):  # values only the caller knows, e.g. where files moved
            if name in kwargs:
                setattr(config, name, kwargs.pop(name))
        _check_trainable_load(config, is_trainable)
        config.inference_mode = not is_trainable
        refuse_ephemeral_gpu_offload(ephemeral_gpu_offload)
        if key_mapping is None and not config.is_prompt_learning:  # as HF PEFT: the base model's renames
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
        klass = TASK_CLASSES.get(config.task_type, cls) if cls is PeftModel else cls
        with loading.all_or_nothing(model, model_id, hub_kwargs):  # a failure leaves `model` as it was
            check_config_for_model(config, model, model_id)  # sizes, before any allocation
            with checks.loading_file(), validate.file_errors(model_id):
                peft_model = klass(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage)
            peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                    key_mapping=key_mapping, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, **kwargs: Any):
        """Load weights from a folder / repo into adapter `adapter_name` (added first if new), all or nothing.

        Returns a LoadResult (missing / unexpected / shape-mismatched keys, per module in `.modules`).
        `strict=True` raises AdapterLoadError carrying that report unless the file fits exactly;
        `ignore_mismatched_sizes=True` skips tensors of another shape (as HF PEFT). A failed load leaves the
        model exactly as it was (checkpoint/loading.py). `low_cpu_mem_usage=True` builds a new adapter on the
        meta device and takes the file's tensors as its weights (no random init); `key_mapping` renames file
        keys (`io.remap_file_keys`); `ephemeral_gpu_offload=True` is refused (not implemented).
        """
        check_adapter_name(adapter_name)
        refuse_ephemeral_gpu_offload(ephemeral_gpu_offload)
        hub_kwargs, rest = io.split_hub_kwargs(kwargs)
        config = None
        if adapter_name not in self.peft_config:
            config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
            _check_trainable_load(config, is_trainable)
            config.inference_mode = not is_trainable
        with loading.all_or_nothing(self, model_id, hub_kwargs):
            if config is not None:
                # sizes, before any allocation
                check_config_for_model(config, self.get_base_model(), model_id)
                with checks.loading_file(), validate.file_errors(model_id):
                    self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                                     autocast_adapter_dtype=autocast_adapter_dtype)
                if is_trainable and not config.is_prompt_learning:
                    # as HF PEFT: the new adapter trains even while another one is active
                    self.set_requires_grad(adapter_name)
            fingerprint.check_fingerprint(self.get_base_model(), model_id, adapter_name,
                                          strict=bool(rest.get("strict", False)), key_mapping=key_mapping,
                                          **hub_kwargs)
            weights = io.load_peft_weights(model_id, device=torch_device, key_mapping=key_mapping,
                                           **hub_kwargs)
            result = set_peft_model_state_dict(
                self, weights, adapter_name=adapter_name, strict=rest.get("strict", False),
                ignore_mismatched_sizes=rest.get("ignore_mismatched_sizes", False))
        loading.warn_about(result, model_id, adapter_name)
        if not is_trainable:
            module_walk.to_eval(self)
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None,
                    commit_description: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", tags: list[str] | None = None):
        """Save to a temporary folder and upload it (the signature of transformers' `PushToHubMixin`, which
        HF PEFT's PeftModel has): `create_pr=True` opens a pull request instead of committing to `revision`,
        `tags` are added to the model card. Adapter files are one file, never sharded: a `max_shard_size`
        below the file's size is refused."""
        return hub.push_folder(self, repo_id, commit_message=commit_message or "Upload model",
                               commit_description=commit_description, private=private, token=token,
                               revision=revision, create_pr=create_pr, max_shard_size=max_shard_size,
                               tags=tags)

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)
