"""`Tuner`: injects a method's adapter layers into a model and manages them as a group.

Generic over methods: a method subclasses it to supply its layer dispatch (`dispatch`), per-target layer
arguments and config preparation. Injection is one transaction (core/transaction.py): checks, then every new
layer is built, then swapped in; a failure deletes the adapter from every holder (layers built for it give
their base layers back) and puts back base weights an init rewrote, so the model is left as it was.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import AdapterStateError, NoMatchingPeftModuleError
from . import grad_flags, module_walk, placement, target_checks, targeting, tying
from .auxiliary import wrap_modules_to_save
from .dispatch import DispatchChain
from .layer import AdapterHolder, AdapterLayer, CallState
from .names import check_adapter_name, known_adapters
from .seams import method_call_keywords
from .target_report import TargetReport
from .transaction import Transaction

if TYPE_CHECKING:
    from ..config import PeftConfig

logger = logging.getLogger(__name__)
MERGED_SET_ADAPTER = "Adapter cannot be set when the model is merged. Unmerging the model first."


@contextmanager
def empty_parameters(enabled: bool, existing: nn.Module):
    """Trainable parameters created inside go to the meta device as they are registered, so the random init
    that follows in their module's constructor costs nothing. Parameters of `existing` (e.g. a bank shared by
    all layers) and frozen ones (bookkeeping such as ranks, not stored in files) stay as they are. The patch
    of `nn.Module.register_parameter` is process-wide while the layers are built (as accelerate's
    `init_empty_weights`): modules built on other threads meanwhile would get meta parameters too."""
    if not enabled:
        yield
        return
    keep = {id(p) for p in module_walk.own_parameters(module_walk.all_modules(existing))}
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.requires_grad and not param.is_meta and id(param) not in keep:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=True)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def set_submodule(root: nn.Module, name: str, module: nn.Module,
                  parents: dict[str, nn.Module] | None = None) -> None:
    """`root.<name> = module`; `parents` (optional) caches parent lookups across many calls."""
    parent_name, _, child = name.rpartition(".")
    parent = parents.get(parent_name) if parents is not None else None
    if parent is None:
        parent = root.get_submodule(parent_name) if parent_name else root
        if parents is not None:
            parents[parent_name] = parent
    setattr(parent, child, module)
    if parents is not None:
        parents.pop(name, None)  # replaced: a later child of `name` must be looked up in the new module


def _base_tensors(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """The base-model parameters and buffers of the targets (inside an adapter layer: its base layer's);
    every tensor of `model` when a method's targets are not modules (e.g. bare parameters)."""
    bases = [m.get_base_layer() if isinstance(m, AdapterLayer) else m for _, m in targets]
    if not all(isinstance(m, nn.Module) for m in bases):
        bases = [model]
    return [t for m in bases for t in (*m.parameters(), *m.buffers())]


def _put_back_grads(grads: list[tuple[nn.Parameter, bool]]) -> None:
    # last to first: a parameter listed twice (shared by two modules) ends with its first, original flag
    for param, flag in reversed(grads):
        param.requires_grad_(flag)


def _set_training(module: nn.Module, mode: bool) -> None:
    """`module.train(mode)` with the same result as nn.Module.train, about 8x faster on adapter layers: plain
    modules get their flag written straight (nn.Module.__setattr__ only stores a bool there, at ~2.5 us a
    call)."""
    if type(module).train is not nn.Module.train:
        module.train(mode)
        return
    if module.training is not mode:
        if type(module).__setattr__ is nn.Module.__setattr__ and "training" in module.__dict__:
            module.__dict__["training"] = mode
        else:
            module.training = mode
    for child in module._modules.values():
        if child is not None:
            _set_training(child, mode)


class Tuner(TargetReport, nn.Module):
    """Holds the user's model as `.model` (hence the `base_model.model.` key prefix) and its adapters."""

    dispatch: DispatchChain
    prefix: str = ""
    # forward keywords this method reads from a call: `call_context` takes them out of the call's kwargs
    call_keywords: tuple[str, ...] = ()
    # False: the method keeps trained modules on the tuner itself (outside the model), so it runs only inside
    # a PeftModel and inject_adapter_in_model refuses it
    injectable: bool = True
    # layers of this method: a target wrapped by one takes the new adapter; others get wrapped (HF nesting)
    layer_family: type | tuple[type, ...] = AdapterLayer

    def __init__(self, model: nn.Module, peft_config: PeftConfig | dict[str, PeftConfig],
                 adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True,
                 state_dict: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = (
            peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config})
        self.active_adapter: str | list[str] = adapter_name
        self.trainable_adapters: set[str] = set()
        self.grad_overrides: dict[str, bool] = {}
        self.autocast_adapter_dtype = autocast_adapter_dtype
        with Transaction(model):  # a method's inject_adapter may add steps after the generic ones: all inside
            self.inject_adapter(self.model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # as HF PEFT: the injected model carries its configs (used by get_peft_model_state_dict)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def model_forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        context = self.call_context(args, kwargs, adapter_names)  # takes this method's call_keywords out
        for key in method_call_keywords().intersection(kwargs):  # another method's: accepted and ignored
            del kwargs[key]
        with self.mixed_batch(adapter_names), self.forward_context(context):
            return self.model(*args, **kwargs)

    def model_generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        # generate runs num_beams (or num_return_sequences) rows per sample, next to each other
        generation_config = getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1)
        copies = beams if (beams or 1) > 1 else (kwargs.get("num_return_sequences") or 1)
        per_input = adapter_names  # an encoder-decoder's encoder sees each input row once
        if adapter_names is not None:
            adapter_names = [name for name in adapter_names for _ in range(copies)]
        context = self.call_context(args, kwargs, adapter_names, copies)
        with self.mixed_batch(adapter_names, encoder_names=per_input), self.forward_context(context):
            return self.model.generate(*args, **kwargs)

    # ---- per-call data for adapter layers (e.g. LoRA's aLoRA offsets): computed once per forward / generate
    def call_context(self, args: tuple, kwargs: dict, adapter_names: list[str] | None,
                     copies: int = 1) -> dict:
        """Values the adapter layers need for this call, from its arguments (pop the method's
        `call_keywords` from `kwargs`); `copies`: rows generate makes per input row. Layers read them as
        `layer.forward_context`. None by default."""
        return {}

    @contextmanager
    def forward_context(self, values: dict):
        """Inside the block every adapter layer reads `forward_context` as `values` (the previous one is
        restored). One write to the call state all holders share (see `bind_call_state`), whatever the number
        of layers."""
        if not values:
            yield
            return
        state = self.call_state
        saved, state.values = state.values, values
        try:
            yield
        finally:
            state.values = saved

    @property
    def call_state(self) -> CallState:
        """This tuner's `CallState`, shared by every holder of the model (bound in `_apply_adapter_state`)."""
        state = self.__dict__.get("_call_state")
        if state is None:
            state = self.__dict__["_call_state"] = CallState()
        return state

    def bind_call_state(self, holders: list[AdapterHolder] | None = None) -> None:
        """Give every holder (default: all of the model's) the shared call state, marking those inside an
        encoder-decoder's encoder. Runs after each change of the layer set (`_apply_adapter_state`: injection,
        deletion, set_adapter, ...), so that a forward or generate call costs O(1) to set up."""
        state = self.call_state
        seq2seq = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        get_encoder = getattr(self.model, "get_encoder", None)
        in_encoder = {id(m) for m in get_encoder().modules()} if seq2seq and get_encoder is not None else ()
        for holder in holders if holders is not None else [h for _, h in self.holders()]:
            holder.bind_call_state(state, id(holder) in in_encoder)
    # ---- end per-call data

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors stored in adapter files outside the module tree (none for layer methods)."""
        return {}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        return set()

    @staticmethod
    def base_file_keys(model: nn.Module, adapter_name: str, config: PeftConfig,
                       modules: list[tuple[str, nn.Module]]) -> list[tuple[str, str]]:
        """(file key, model key) of base-model tensors that this method's adapter files hold too (e.g. biases
        a `bias` option trains); `modules`: `model.named_modules()`. Static: a model injected without a
        PeftModel has no tuner to ask. None by default."""
        return []

    def convert_loaded_state(self, adapter_name: str, tensors: dict[str, torch.Tensor],
                             root: nn.Module) -> dict[str, torch.Tensor]:
        """File tensors of `adapter_name` rewritten before loading (e.g. LoRA: v4 MoE layouts); keys as in
        `root`."""
        return tensors

    def converted_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor], config_dict: dict,
                             initial_dir: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Files of an adapter that changed the base weights, rewritten for the original base model
        (save_pretrained's `path_initial_model_for_weight_conversion`; LoRA's PiSSA / OLoRA). Methods without
        such a form refuse."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot convert adapter '{adapter_name}' on save: "
            "path_initial_model_for_weight_conversion applies to adapters whose initialisation rewrote the "
            "base weights, and this method has no such initialisation."
        )

    # ------------------------------------------------------------------ method hooks
    def prepare_config(self, config: PeftConfig, model: nn.Module) -> PeftConfig:
        """Fill defaults (e.g. target_modules from the model type) and refuse unsupported options."""
        return config

    def prepare_model(self, model: nn.Module, config: PeftConfig) -> None:
        """Change the model before the targets are looked up (LoRA's layer_replication); default: nothing."""

    def layer_kwargs(self, config: PeftConfig, key: str, module: nn.Module) -> dict:
        """Per-target arguments for `update_layer` (e.g. rank / alpha from patterns)."""
        return {}

    def check_new_adapter(self, config: PeftConfig) -> None:
        """Refuse a config that cannot live next to the adapters already present."""

    def hooks_for(self, config: PeftConfig) -> Tuner:
        """The tuner whose method hooks serve `config`: this one (a mixed model's: that method's tuner)."""
        return self

    def mixed_model_refusals(self, config: PeftConfig) -> list[str]:
        """Options of `config` that need this method's own tuner (injection steps, per-call values)."""
        return []

    # ------------------------------------------------------------------ injection
    def holders(self) -> Iterator[tuple[str, AdapterHolder]]:
        # holders never sit inside another layer's per-adapter entries: the walk leaves those out
        for name, module in module_walk.named_modules(self.model, adapter=None):
            if isinstance(module, AdapterHolder):
                yield name, module

    def adapter_layers(self) -> Iterator[AdapterLayer]:
        for _, module in self.holders():
            if isinstance(module, AdapterLayer):
                yield module

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        """Build and insert the layers of `adapter_name`, all or nothing (core/transaction.py): checks, then
        every new layer is built, then swapped in. `low_cpu_mem_usage`: adapter parameters are created on the
        meta device (no memory, no random init) and get their values and device from the next load.
        `state_dict` (file keys of the adapter about to be loaded): its modules are the targets, not the
        config's."""
        check_adapter_name(adapter_name)
        with Transaction(model) as tx:
            created: list[tuple[str, AdapterLayer]] = []
            tx.on_failure(lambda: self._take_back_adapter(model, adapter_name, created))
            config, targets = self._checked_targets(model, adapter_name, state_dict)
            self.peft_config[adapter_name] = config
            if config.rewrites_base_weights:  # e.g. an init that rewrites the weights it adapts: copied first
                tx.keep_values(_base_tensors(model, targets), device="cpu")
            with empty_parameters(low_cpu_mem_usage, self):
                updated = self._build_layers(targets, adapter_name, config, created)
            parents: dict[str, nn.Module] = {}
            for name, layer in created:
                set_submodule(model, name, layer, parents)
            wrap_modules_to_save(model, adapter_name, getattr(config, "modules_to_save", None))
            for layer in [layer for _, layer in created] + updated:
                self._place_adapter(layer, adapter_name, autocast_adapter_dtype)
            if adapter_name in self.active_adapters and not config.inference_mode:
                self.trainable_adapters.add(adapter_name)
            grads = self._freeze_base()
            tx.on_failure(lambda: _put_back_grads(grads))  # activation changes other adapters' flags too
            self._apply_adapter_state()

    def _checked_targets(self, model: nn.Module, adapter_name: str, state_dict: dict | None):
        """(prepared config, targets): the checks of an injection, before any layer is built."""
        hooks = self.hooks_for(self.peft_config[adapter_name])
        config = hooks.prepare_config(self.peft_config[adapter_name], model)
        hooks.check_new_adapter(config)
        hooks.prepare_model(model, config)
        hooks._state_dict_modules = None if state_dict is None else hooks._modules_in(state_dict)
        try:
            targets = hooks.select_targets(model, config)
        finally:
            hooks._state_dict_modules = None
        # unsupported types, entries matching nothing
        target_checks.check_targets(hooks, model, config, targets)
        return config, targets

    # methods whose other options refer to target_modules (IA3's feedforward_modules) keep the list as given
    condense_target_list = True

    def select_targets(self, model: nn.Module, config: PeftConfig) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs that get the adapter; HF PEFT's target_modules rules unless a method
        overrides."""
        targets = getattr(config, "target_modules", None)
        if self.condense_target_list and isinstance(targets, (list, set)) \
                and len(targets) >= targeting.CONDENSE_FROM:
            names = [n for n, _ in model.named_modules()]
            config.target_modules = targeting.condense_targets(set(targets), names)
        candidates = targeting.candidate_modules(model, (AdapterHolder,))
        targets = [(n, m) for n, m in candidates if targeting.is_target(config, n)]
        if self.__dict__.get("_state_dict_modules") is not None:
            targets = self._targets_from_state_dict(candidates, targets)
        if not targets:
            raise NoMatchingPeftModuleError(self._no_target_message(config, [n for n, _ in candidates]))
        return targets

    def _modules_in(self, state_dict: dict) -> set[str]:
        """Module names that own the adapter tensors of `state_dict` (keys like
        `blocks.0.to_q.lora_A.weight`)."""
        if not self.prefix:
            raise NotImplementedError(f"{type(self).__name__} cannot take its targets from a state_dict.")
        return {key.rsplit("." + self.prefix, 1)[0] for key in state_dict if "." + self.prefix in key}

    def _targets_from_state_dict(self, candidates, from_config):
        """As HF PEFT: the state_dict's modules are the targets; a difference with the config is logged."""
        names = self._state_dict_modules
        targets = [(n, m) for n, m in candidates if n in names]
        unknown = sorted(names - {n for n, _ in candidates})
        if unknown:
            raise ValueError(f"The state_dict holds adapter tensors for modules the model has not (or cannot "
                             f"adapt): {unknown[:5]}. Pass the state_dict written for this model.")
        if {n for n, _ in targets} != {n for n, _ in from_config}:
            logger.warning("The state_dict targets %d module(s), the config's target_modules %d; the "
                           "state_dict's are used.", len(targets), len(from_config))
        return targets

    def _build_layers(self, targets, adapter_name: str, config: PeftConfig,
                      created: list[tuple[str, AdapterLayer]]) -> list[AdapterLayer]:
        """New layers for the targets not yet adapted (into `created`, not in the model yet); adapter layers
        already there get the adapter added (returned)."""
        updated: list[AdapterLayer] = []
        hooks = self.hooks_for(config)
        for name, module in targets:
            if isinstance(module, hooks.layer_family):
                updated.append(module)
                module.update_layer(adapter_name, config, **hooks.layer_kwargs(config, name, module))
                continue
            base = module.get_base_layer() if isinstance(module, AdapterLayer) else module  # wrapped: inside
            kwargs = hooks.layer_kwargs(config, name, base)
            created.append((name, hooks.dispatch.resolve(base, name)(module, adapter_name, config, **kwargs)))
        return updated

    def _take_back_adapter(self, model: nn.Module, adapter_name: str, created) -> None:
        """Undo a failed injection: layers built for it give their base layers back, every holder loses the
        adapter (holders left empty, such as new modules_to_save wrappers, are unwrapped), its config goes."""
        for name, layer in created:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if parent._modules.get(child) is not layer:  # built, never swapped in
                layer.release()
        self._remove_adapter(adapter_name)

    def _remove_adapter(self, adapter_name: str) -> None:
        """`adapter_name` out of every holder and the configs; the active adapters are the caller's."""
        for _, holder in list(self.holders()):
            holder.delete_adapter(adapter_name)
        self.peft_config.pop(adapter_name, None)
        self.trainable_adapters.discard(adapter_name)
        self.grad_overrides.pop(adapter_name, None)
        self._drop_empty_layers()

    def _no_target_message(self, config: PeftConfig, names: list[str]) -> str:
        close = targeting.close_matches(config, names)
        wanted = config.target_modules
        shown = repr(wanted)
        if isinstance(wanted, set):
            shown = repr(sorted(wanted)[:10]) + ("..." if len(wanted) > 10 else "")
        return (
            f"target_modules={shown} matched no module of the model" + targeting.filters_note(config)
            + f". Module names that look close: {close}. Set target_modules to names (or dotted suffixes) of "
            "modules in model.named_modules(), a full-match regex string, or 'all-linear'."
        )

    def _place_adapter(self, layer: AdapterLayer, adapter_name: str, autocast: bool) -> None:
        """New adapter weights onto the base layer's device and dtype (core/placement.py)."""
        _set_training(layer, layer.get_base_layer().training)  # new dropout etc. follow the model's mode
        placement.place_new(layer, adapter_name, autocast)

    def place_loaded(self, adapter_name: str) -> None:
        """After a load that gave meta-device adapter weights their values: onto their base's device."""
        placement.place_loaded(self.adapter_layers(), adapter_name)

    # ------------------------------------------------------------------ activity and training state
    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    def _freeze_base(self) -> list[tuple[nn.Parameter, bool]]:
        """On injection (as HF PEFT): every parameter except adapter ones stops training. Returns every
        parameter's flag from before (same walk), for a failed injection to put back."""
        before = []
        # each module's own parameters (not model.parameters(): its per-module generators cost ~3x at
        # ~15k modules); a shared parameter comes twice, the second time with False (see _put_back_grads)
        for module in module_walk.all_modules(self.model):
            for param in module._parameters.values():
                if param is not None:
                    before.append((param, param.requires_grad))
                    if param.requires_grad:
                        param.requires_grad_(False)
        return before

    def _apply_adapter_state(self) -> None:
        """Activate the active adapters; those in `self.trainable_adapters` get requires_grad, others not."""
        active = self.active_adapters
        trainable = [n for n in active if n in self.trainable_adapters]
        holders = [holder for _, holder in self.holders()]
        for holder in holders:
            holder.set_adapter(active, trainable)
        # the layer set may have changed: new holders read this tuner's call state
        self.bind_call_state(holders)
        for name in trainable:
            self.hooks_for(self.peft_config[name]).mark_extra_trainable(name, self.peft_config[name])
        grad_flags.apply_overrides(holders, self.grad_overrides)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Training on or off for the named adapters, active or not (modules_to_save copies included); as HF
        PEFT, it lasts until the next `set_adapter` (adding or loading other adapters keeps it)."""
        chosen = dict.fromkeys(known_adapters(self.peft_config, adapter_names), requires_grad)
        self.grad_overrides.update(chosen)
        grad_flags.apply_overrides([h for _, h in self.holders()], chosen)

    def mark_extra_trainable(self, adapter_name: str, config: PeftConfig) -> None:
        """Hook for method options that train base parameters too (e.g. LoRA's `bias`)."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate `adapter_name`(s); they become trainable unless `inference_mode` (as HF PEFT)."""
        names = known_adapters(self.peft_config, adapter_name)
        if any(layer.merged for layer in self.adapter_layers()):
            # a merged adapter stays in the weights whatever is active: unmerge first, as HF PEFT
            warnings.warn(MERGED_SET_ADAPTER, stacklevel=2)
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        self.trainable_adapters = set() if inference_mode else set(names)
        self.grad_overrides.clear()  # as HF PEFT: set_adapter decides every flag again
        self._apply_adapter_state()

    def enable_adapter_layers(self) -> None:
        for _, holder in self.holders():
            holder.enable_adapters(True)
        self._apply_adapter_state()

    def disable_adapter_layers(self) -> None:
        for _, holder in self.holders():
            holder.enable_adapters(False)

    @contextmanager
    def adapters_disabled(self):
        grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()
            for n, p in self.model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))

    @contextmanager
    def mixed_batch(self, adapter_names: list[str] | None, encoder_names: list[str] | None = None):
        """Inside the block every adapter layer runs sample i with adapter `adapter_names[i]`; layers inside
        an encoder-decoder's encoder use `encoder_names` instead when given (generate: one row per input, not
        per beam)."""
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; loaded: "
                             f"{sorted(self.peft_config)}.")
        self._refuse_checkpointed_mixed_batch()
        state = self.call_state
        saved = state.names, state.encoder_names
        state.names, state.encoder_names = adapter_names, encoder_names
        try:
            yield
        finally:
            state.names, state.encoder_names = saved

    def _refuse_checkpointed_mixed_batch(self) -> None:
        """Activation checkpointing re-runs each block in backward, after the call has reset the per-row
        names: the re-run would use the active adapter for every row (reentrant: silently wrong gradients)."""
        if not (self.model.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            raise AdapterStateError(
                "adapter_names=[...] (a mixed batch) in a training forward with activation checkpointing on: "
                "the checkpointed blocks are re-run in backward without the per-row adapter names, so the "
                "gradients would be wrong. Train each adapter on its own batch (set_adapter), or turn "
                "checkpointing off (model.gradient_checkpointing_disable()); for inference call model.eval() "
                "or use torch.no_grad()."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter '{adapter_name}' does not exist; loaded: {sorted(self.peft_config)}.")
        self._remove_adapter(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            self.trainable_adapters.add(remaining[0])  # as HF PEFT: the adapter taking over can train
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
        self._apply_adapter_state()

    def _drop_empty_layers(self) -> None:
        for name, holder in reversed(list(self.holders())):
            if not holder.adapter_names() and not getattr(holder, "nested", False):
                set_submodule(self.model, name, holder.unloaded(merge=False))

    # ------------------------------------------------------------------ merging and unloading
    def _top_layers(self) -> list[AdapterLayer]:
        return [layer for layer in self.adapter_layers() if not layer.nested]

    def check_mergeable(self) -> None:
        """Hook: refuse merging when the adapters' layout makes it wrong (e.g. LoRA's layer_replication)."""

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.check_mergeable()
        was_tied = tying.embeddings_tied(self.model)
        # tied weights (core/tying.py)
        tying.untie_before_merge(self.model, self.adapter_layers(), adapter_names)
        tying.record_untied_embeddings(self.model, was_tied)
        for layer in self._top_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for layer in self._top_layers():
            layer.unmerge()

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: list[str] | None = None) -> nn.Module:
        was_tied = tying.embeddings_tied(self.model)
        if merge:
            self.check_mergeable()
            # tied weights (core/tying.py)
            tying.untie_before_merge(self.model, self.adapter_layers(), adapter_names)
        holders = [(n, h) for n, h in self.holders() if not getattr(h, "nested", False)]
        if progressbar:
            from tqdm.auto import tqdm

            holders = tqdm(holders, desc="Unloading " + ("and merging " if merge else "") + "model")
        for name, holder in reversed(list(holders)):
            set_submodule(self.model, name, holder.unloaded(merge, safe_merge=safe_merge,
                                                            adapter_names=adapter_names))
        # a merged export must not re-tie diverged weights
        tying.record_untied_embeddings(self.model, was_tied)
        # as HF PEFT: no adapter config left on it
        if self.model.__dict__.get("peft_config") is self.peft_config:
            del self.model.__dict__["peft_config"]
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self._unload(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._unload(False)
