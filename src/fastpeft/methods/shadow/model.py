"""`ShadowModel`: the ShadowPEFT tuner (decoder-only causal LMs and sequence classifiers).

Besides the wrapped blocks (layer.py) it holds, per adapter, the shadow backbone, the projection to the base
width and (SEQ_CLS) a copy of the classifier head, in `shadow_backbone` / `shadow_projection` /
`shadow_head` (file keys `base_model.shadow_<part>.default.*`, as HF PEFT). Two hooks on the base model run
each forward: before it, the seed state s0 = projection(backbone(inputs)) is computed (and a `ShadowCache`
unpacked); after it, the shadow backbone's cache is packed with the base cache for the next decoding step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...checkpoint.keys import write_tensor
from ...core.dispatch import DispatchChain
from ...core.transaction import Transaction
from ...core.tuner import Tuner
from ...types import TaskType
from . import backbone as bb
from .cache import ShadowCache
from .detached import DetachedShadowModel
from .layer import ShadowLayer, ShadowRun

DISPATCH = DispatchChain("ShadowPEFT")
DISPATCH.register(nn.Module, ShadowLayer)

CONTAINERS = ("shadow_backbone", "shadow_projection", "shadow_head")
FILE_LABEL = "default"  # the adapter's part of the file keys, whatever its name (HF PEFT's format)
_TASKS = (TaskType.CAUSAL_LM.value, TaskType.SEQ_CLS.value)
_CACHE_KEYS = ("cache", "past_key_values")
_MIXED = ("ShadowPEFT does not serve mixed-adapter batches (adapter_names=[...]): the shadow state runs "
          "through every block with one adapter. Use set_adapter per batch.")


class ShadowModel(Tuner):
    """Wraps contiguous decoder blocks in `ShadowLayer`s and keeps the model-level shadow modules.

    One adapter is active at a time. Not mergeable (`unload()` gives the base model back; `unload_shadow()`
    the shadow network alone).
    """

    dispatch = DISPATCH
    injectable = False  # the shadow backbone lives on the tuner: only inside a PeftModel

    # ------------------------------------------------------------------ state kept outside the model
    def _ensure_state(self) -> None:
        if "shadow_backbone" not in self._modules:
            for name in CONTAINERS:
                setattr(self, name, nn.ModuleDict())
        if "_shadow_run" not in self.__dict__:
            self.__dict__.update(_shadow_run=ShadowRun(), _shadow_hooks=[], _shadow_share={},
                                 _shadow_lm_head={}, _shadow_seed=None, _shadow_past=None,
                                 _shadow_pack=False, last_shadow_loss=None)

    # ------------------------------------------------------------------ config and targets
    def prepare_config(self, config, model):
        task = _task(config)
        if task not in _TASKS:
            raise ValueError(
                f"ShadowPEFT supports task_type 'CAUSAL_LM' and 'SEQ_CLS' (decoder-only models), got "
                f"{task!r}. Set task_type to one of them.")
        if _is_diffusion_transformer(model):
            raise NotImplementedError(
                "ShadowPEFT on diffusion transformers (HF PEFT's Diffusers backends) is not implemented in "
                "fastpeft; it adapts decoder-only transformers language models.")
        if config.layers_to_transform is not None:
            # HF PEFT 0.21 ignores it here (whole-block names bypass its layer filter) and wraps every block
            raise NotImplementedError(
                "ShadowConfig.layers_to_transform is not supported: the targets are whole blocks, so pick "
                "them by name, e.g. target_modules=['model.layers.1', 'model.layers.2'] (consecutive "
                "blocks).")
        if config.target_modules is None:
            config.target_modules = bb.default_block_names(model)
        return config

    def check_new_adapter(self, config) -> None:
        if len(self.peft_config) > 1 and any(_task(c) == TaskType.SEQ_CLS.value
                                             for c in self.peft_config.values()):
            raise ValueError(
                "ShadowPEFT holds one adapter when any adapter is for sequence classification (its "
                "classifier is both in modules_to_save and copied as the shadow head). Use one PeftModel "
                "per adapter.")

    def select_targets(self, model, config):
        targets = super().select_targets(model, config)
        _check_contiguous_blocks(model, [name for name, _ in targets])
        existing = [name for name, module in model.named_modules() if isinstance(module, ShadowLayer)]
        if existing and sorted(existing) != sorted(name for name, _ in targets):
            raise ValueError(
                f"ShadowPEFT adapters of one model must wrap the same blocks (the shadow state runs from the "
                f"first wrapped block to the last): the model has {existing[:3]}..., the new adapter targets "
                f"{[n for n, _ in targets][:3]}.... Give the new adapter the same target_modules.")
        return targets

    def layer_kwargs(self, config, key, module):
        return {"hidden_size": bb.hidden_size(self.model.config)}

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model, adapter_name, **options) -> None:
        self._ensure_state()
        with Transaction(model) as tx:
            tx.on_failure(self._refresh_boundaries)  # runs after the adapter is taken back
            super().inject_adapter(model, adapter_name, **options)
            self._refresh_boundaries()

    def _build_layers(self, targets, adapter_name, config, created):
        # the model-level modules first, then the layers: HF PEFT's order, so one seed gives the same init
        if adapter_name not in self.shadow_backbone:
            self._build_shadow_modules(adapter_name, config)
        return super()._build_layers(targets, adapter_name, config, created)

    def _build_shadow_modules(self, adapter_name: str, config) -> None:
        backbone, projection, share = self._backbone_and_projection(config)
        if share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens  # fed the frozen base embeddings instead
        is_cls = _task(config) == TaskType.SEQ_CLS.value
        head = bb.classifier_head(self.model) if is_cls else None
        head = copy.deepcopy(head) if head is not None else None
        ref = next(self.model.parameters(), None)
        for module in (backbone, projection, head):
            if module is not None and ref is not None:
                _place(module, ref)
        self.shadow_backbone[adapter_name] = backbone
        self.shadow_projection[adapter_name] = projection
        if head is not None:
            self.shadow_head[adapter_name] = head
        self._shadow_share[adapter_name] = share
        self._shadow_lm_head[adapter_name] = not is_cls

    def _backbone_and_projection(self, config) -> tuple[nn.Module, nn.Module, bool]:
        """(backbone, projection to the base width, whether the base embeddings feed the backbone)."""
        mirror = config.shadow_model == "mirror"
        if mirror:
            backbone, projection = bb.build_mirror(self.model, config), None
        else:
            backbone, projection = bb.load_pretrained(config.shadow_model)
        base_width, width = bb.hidden_size(self.model.config), bb.hidden_size(backbone.config)
        if projection is None:
            projection = nn.Linear(width, base_width, bias=False) if width != base_width else nn.Identity()
        elif (projection.in_features, projection.out_features) != (width, base_width):
            raise ValueError(
                f"The projection of shadow_model={config.shadow_model!r} maps {projection.in_features} -> "
                f"{projection.out_features}, but the shadow / base hidden sizes are {width} / {base_width}.")
        # the base embeddings feed only a mirrored backbone of the base width (a pretrained one keeps its own)
        share = mirror and config.share_embeddings and width == base_width
        return backbone, projection, share and bb.takes_inputs_embeds(backbone)

    def _place_adapter(self, layer, adapter_name: str, autocast: bool) -> None:
        """As HF PEFT for whole-block targets (a block has no single weight to follow): the layer's adapter
        tensors keep the dtype they were built in (no rounding through a half-precision base dtype) and only
        move to the block's device."""
        layer.train(layer.get_base_layer().training)
        ref = next(layer.get_base_layer().parameters(), None)
        for _, param in layer.adapter_parameters(adapter_name):
            if ref is not None and not param.is_meta and param.device != ref.device:
                param.data = param.data.to(ref.device)

    def _remove_adapter(self, adapter_name: str) -> None:
        super()._remove_adapter(adapter_name)
        for name in CONTAINERS:
            container = self._modules.get(name)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        for table in (self.__dict__.get("_shadow_share"), self.__dict__.get("_shadow_lm_head")):
            if table is not None:
                table.pop(adapter_name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._refresh_boundaries()

    def _refresh_boundaries(self) -> None:
        """Give the wrapped blocks their roles (first / last) and the run state; (re)hook the base model."""
        for handle in self._shadow_hooks:
            handle.remove()
        self._shadow_hooks.clear()
        layers = [m for _, m in self.model.named_modules() if isinstance(m, ShadowLayer)]
        for layer in layers:
            layer.__dict__.update(shadow_run=self._shadow_run, shadow_entry=layer is layers[0],
                                  shadow_exit=layer is layers[-1])
        if layers:
            self._shadow_hooks.append(self.model.register_forward_pre_hook(self._seed_hook, with_kwargs=True))
            self._shadow_hooks.append(self.model.register_forward_hook(self._pack_hook, with_kwargs=True))

    # ------------------------------------------------------------------ activity and training state
    def _apply_adapter_state(self) -> None:
        super()._apply_adapter_state()
        trainable = {n for n in self.active_adapters if n in self.trainable_adapters}
        for name in CONTAINERS:
            for adapter, module in self._modules.get(name, {}).items():
                module.requires_grad_(adapter in trainable)
        for adapter, backbone in self._modules.get("shadow_backbone", {}).items():
            if self.peft_config[adapter].shadow_model != "mirror":
                bb.freeze_embeddings(backbone)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"ShadowPEFT runs exactly one adapter at a time, got {len(names)}: {names}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _entry_layer(self) -> ShadowLayer | None:
        return next((m for m in self.model.modules() if isinstance(m, ShadowLayer)), None)

    def shadow_path_active(self) -> bool:
        entry = self._entry_layer()
        active = self.active_adapters
        return (entry is not None and not entry.disable_adapters and bool(active)
                and active[0] in entry.shadow_down)

    # ------------------------------------------------------------------ forward
    def _seed_hook(self, module, args, kwargs):
        """Before the base model runs: unpack a ShadowCache, compute s0 from the raw inputs (only here are
        the token ids and the 2D attention mask at hand)."""
        self._shadow_run.seed = self.__dict__["_shadow_seed"] = None
        self.__dict__["_shadow_pack"] = False
        kwargs, shadow_past = _unpack_cache(dict(kwargs))
        if not self.shadow_path_active():
            return args, kwargs
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise ValueError("ShadowPEFT needs input_ids or inputs_embeds to compute the shadow state.")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(getattr(self.model, "config", None), "use_cache", False))
        if shadow_past is None:
            _refuse_filled_cache(kwargs)
        seed, past = self._initial_state(self.active_adapters[0], ids, embeds, kwargs, shadow_past, use_cache)
        self._shadow_run.seed = self.__dict__["_shadow_seed"] = seed
        self.__dict__.update(_shadow_past=past, _shadow_pack=bool(use_cache))
        return args, kwargs

    def _initial_state(self, adapter: str, ids, embeds, kwargs: dict, past, use_cache: bool):
        """s0 = projection(backbone(x)) (batch, seq, d), and the backbone's cache."""
        backbone = self.shadow_backbone[adapter]
        options = {"attention_mask": kwargs.get("attention_mask"), "use_cache": use_cache,
                   "return_dict": True}
        if kwargs.get("position_ids") is not None:
            options["position_ids"] = kwargs["position_ids"]
        if past is not None:
            options[bb.cache_keyword(backbone)] = past
        if embeds is None and self._shadow_share.get(adapter, False):
            embeds = self.model.get_input_embeddings()(ids)  # the frozen base table, (batch, seq, d)
        if embeds is not None:
            out = backbone(inputs_embeds=embeds, **options)
        else:
            out = backbone(input_ids=ids, **options)
        return self.shadow_projection[adapter](out.last_hidden_state), bb.output_cache(out)

    def _pack_hook(self, module, args, kwargs, output):
        """After the base model: its cache and the shadow backbone's travel on as one ShadowCache."""
        self._shadow_run.seed = None
        if not self.__dict__.get("_shadow_pack"):
            return output
        self.__dict__["_shadow_pack"] = False
        past, self.__dict__["_shadow_past"] = self.__dict__["_shadow_past"], None
        for key in _CACHE_KEYS:
            base = output.get(key) if hasattr(output, "get") else None
            if base is not None:
                output[key] = ShadowCache(base=base, shadow=past)
                break
        return output

    def forward(self, *args, **kwargs):
        # as HF PEFT's ShadowModel.forward: a call of the tuner itself also adds the auxiliary loss
        return self.model_forward(*args, **kwargs)

    def model_forward(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            raise ValueError(_MIXED)
        labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
        self.last_shadow_loss = None
        try:
            output = super().model_forward(*args, **kwargs)
        finally:
            self._shadow_run.seed = None
        if labels is None or getattr(output, "loss", None) is None or self._shadow_seed is None:
            return output
        shadow_loss = self.shadow_auxiliary_loss(labels, attention_mask=mask)
        if shadow_loss is not None:
            # reported detached (logging); the live term trains the shadow path (Eq. 9)
            self.last_shadow_loss = output.shadow_loss = shadow_loss.detach()
            weight = self.peft_config[self.active_adapters[0]].auxiliary_loss_weight
            if weight > 0:
                output.loss = output.loss + weight * shadow_loss
        return output

    def model_generate(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            raise ValueError(_MIXED)
        try:
            return super().model_generate(*args, **kwargs)
        finally:
            self._shadow_run.seed = None

    def mixed_batch(self, adapter_names, encoder_names=None):
        if adapter_names is not None:
            raise ValueError(_MIXED)
        return super().mixed_batch(None)

    def _shadow_head_of(self, adapter: str) -> nn.Module | None:
        if adapter in self.shadow_head:
            return self.shadow_head[adapter]
        return self.model.get_output_embeddings() if self._shadow_lm_head.get(adapter, False) else None

    def shadow_auxiliary_loss(self, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
                              ) -> torch.Tensor | None:
        """The shadow path's own task loss on s0 of the last forward (unweighted): next-token CE of
        lm_head(s0), or the classification loss of head(s0 at the last real token). s0 is what the detached
        shadow model computes, so this trains it (paper Eq. 8)."""
        adapter = self.active_adapters[0]
        head, seed = self._shadow_head_of(adapter), self._shadow_seed
        if head is None or seed is None:
            return None
        if self._shadow_lm_head.get(adapter, False):
            return bb.next_token_loss(head(seed), labels)
        return bb.classification_loss(head(bb.pool_last_token(seed, attention_mask)), labels)

    # ------------------------------------------------------------------ merging, unloading, detaching
    def check_mergeable(self) -> None:
        raise NotImplementedError(
            "ShadowPEFT cannot be merged into the base model: its change depends on the input (a shadow "
            "state that evolves through the layers), not a fixed weight delta. Use unload() for the plain "
            "base model, or unload_shadow() for the standalone shadow network.")

    def _unload(self, merge, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self.check_mergeable()
        for handle in self._shadow_hooks:
            handle.remove()
        self._shadow_hooks.clear()
        return super()._unload(merge, progressbar, safe_merge, adapter_names)

    def unload_shadow(self, adapter_name: str | None = None, copy: bool = False) -> DetachedShadowModel:
        """The shadow network of `adapter_name` (default: the active one) without the base model.

        `copy=False` shares the modules with this model; `copy=True` copies them, and gives the backbone a
        copy of the base input embeddings it was fed, so that the result saves complete.
        """
        adapter = self.active_adapters[0] if adapter_name is None else adapter_name
        if adapter not in self.shadow_backbone:
            raise ValueError(f"No shadow network for adapter {adapter!r}; adapters: "
                             f"{sorted(self.shadow_backbone)}.")
        take = _deepcopy if copy else (lambda module: module)
        backbone = take(self.shadow_backbone[adapter])
        projection = take(self.shadow_projection[adapter])
        head = self._shadow_head_of(adapter)
        head = take(head) if head is not None else None
        shared = None
        if self._shadow_share.get(adapter, False):
            if copy:
                backbone.embed_tokens = _deepcopy(self.model.get_input_embeddings())
            else:
                shared = self.model.get_input_embeddings()
        is_cls = _task(self.peft_config[adapter]) == TaskType.SEQ_CLS.value
        return DetachedShadowModel(backbone, projection, head, is_classification=is_cls,
                                   input_embeddings=shared)

    # ------------------------------------------------------------------ files
    def _file_tensors(self, adapter: str):
        """(file key, tensor) of the model-level modules of `adapter` (parameters and persistent buffers)."""
        for name in CONTAINERS:
            container = self._modules.get(name)
            if container is None or adapter not in container:
                continue
            for key, tensor in container[adapter].state_dict(keep_vars=True).items():
                yield f"base_model.{name}.{FILE_LABEL}.{key}", tensor

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {key: tensor.detach() for key, tensor in self._file_tensors(adapter_name)}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        """The shadow backbone / projection / head tensors; every key and shape checked before writing."""
        wanted = dict(self._file_tensors(adapter_name))
        if not wanted:
            return set()
        missing = sorted(k for k in wanted if k not in tensors)
        if missing:
            raise ValueError(
                f"The ShadowPEFT adapter file lacks {len(missing)} shadow network tensor(s), e.g. "
                f"{missing[:3]}; it was saved for another shadow configuration (shadow_* sizes, task_type) "
                "or is not a ShadowPEFT file. Load it with the adapter_config.json it was saved with.")
        wrong = [(k, tuple(tensors[k].shape), tuple(t.shape)) for k, t in wanted.items()
                 if tuple(tensors[k].shape) != tuple(t.shape)]
        if wrong:
            raise ValueError(f"ShadowPEFT shadow network tensors have another shape in the file than in "
                             f"the model (key, file, model): {wrong[:3]}. Load it with the config it was "
                             "saved with.")
        with torch.no_grad():
            for key, target in wanted.items():
                write_tensor(target, tensors[key])
        return set(wanted)


# ------------------------------------------------------------------ helpers
def _task(config) -> str | None:
    return getattr(config.task_type, "value", config.task_type)


def _deepcopy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def _place(module: nn.Module, ref: torch.Tensor) -> None:
    """As HF PEFT: the new modules take the base model's dtype and device (meta parameters: the dtype)."""
    if any(p.is_meta for p in module.parameters()):
        module.to(dtype=ref.dtype)
    else:
        module.to(device=ref.device, dtype=ref.dtype)


def _is_diffusion_transformer(model: nn.Module) -> bool:
    blocks = ("transformer_blocks", "single_transformer_blocks")
    return any(isinstance(getattr(model, n, None), nn.ModuleList) for n in blocks) and not isinstance(
        getattr(model, "layers", None), nn.ModuleList)


def _unpack_cache(kwargs: dict) -> tuple[dict, object]:
    """kwargs with a ShadowCache replaced by its base cache, and its shadow cache (None if there was none)."""
    for key in _CACHE_KEYS:
        value = kwargs.get(key)
        if isinstance(value, ShadowCache):
            kwargs[key] = value.base
            return kwargs, value.shadow
    return kwargs, None


def _refuse_filled_cache(kwargs: dict) -> None:
    """A plain cache that already holds tokens has no shadow counterpart: s0 of the new tokens alone would
    miss their context."""
    for key in _CACHE_KEYS:
        value = kwargs.get(key)
        length = getattr(value, "get_seq_length", None)
        if callable(length) and length() > 0:
            raise ValueError(
                f"`{key}` holds {length()} cached positions but is not a ShadowCache, so the shadow backbone "
                "has no cache for them. Pass back the cache a previous forward of this model returned (it "
                "carries both), or run the whole sequence without a cache.")


def _check_contiguous_blocks(model: nn.Module, names: list[str]) -> None:
    """The shadow state runs from the first wrapped block to the last: the targets must be consecutive items
    of one nn.ModuleList."""
    parents = {name.rpartition(".")[0] for name in names}
    problem = None
    if len(parents) != 1:
        problem = f"they sit in {len(parents)} different modules"
    else:
        parent_name = parents.pop()
        parent = model.get_submodule(parent_name) if parent_name else model
        indices = sorted(int(n.rpartition(".")[2]) if n.rpartition(".")[2].isdigit() else -1 for n in names)
        if not isinstance(parent, nn.ModuleList) or indices[0] < 0:
            problem = f"'{parent_name}' is not an nn.ModuleList of decoder blocks"
        elif indices != list(range(indices[0], indices[0] + len(indices))):
            problem = f"indices {indices} have gaps"
    if problem:
        raise ValueError(
            f"ShadowPEFT wraps whole decoder blocks, consecutive items of one nn.ModuleList, but the targets "
            f"{sorted(names)[:4]} do not qualify: {problem}. Target blocks such as r'.*\\.layers\\.\\d+$' "
            "(or leave target_modules unset for every block).")
