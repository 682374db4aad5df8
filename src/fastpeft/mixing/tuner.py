"""`MixedModel`: one tuner holding adapters of several methods at once (HF PEFT's `peft.tuners.mixed`).

Each adapter goes through the core `Tuner` injection with its own method's hooks (`hooks_for`): a view of
that method's tuner class over the same model answers prepare_config, select_targets, layer_kwargs, dispatch
and the training hooks. A target already wrapped by another method's layer is wrapped again
(`Tuner.layer_family`), so one module may hold a chain, the newest method outermost, each layer running the
one inside it (as HF PEFT nests them): an OFT layer rotates the input of everything inside it, an additive
layer adds its delta to the output of everything inside it. Which methods may mix is each method's
declaration (`MethodSpec.mixable`).

Files: every layer of a chain stores its tensors under the target's own path, as in the files HF PEFT writes
for one method (where the adapter being loaded is the outermost layer); `file_keys_for_save` /
`convert_loaded_state` translate between those keys and the chain's `base_layer` paths.
"""

from __future__ import annotations

from torch import nn

from ..core.layer import AdapterLayer
from ..core.tuner import Tuner
from ..registry import get_spec, registered
from ..types import PeftType


def compatible_types() -> tuple[PeftType, ...]:
    """The methods that declare themselves mixable (`MethodSpec.mixable`), in registration order."""
    return tuple(peft_type for peft_type, spec in registered().items() if spec.mixable)


def check_mixable(config) -> None:
    """Refuse a config a mixed model cannot hold: another method, or an option needing its own tuner."""
    peft_type = getattr(config, "peft_type", None)
    value = getattr(peft_type, "value", peft_type)
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"{value} is a prompt-learning method: it rewrites the model's inputs and cannot be mixed with "
            "other adapters in a PeftMixedModel. Use get_peft_model(model, config) without mixed=True.")
    spec = get_spec(peft_type)
    if not spec.mixable or spec.tuner_cls is None:
        names = ", ".join(t.value for t in compatible_types())
        raise ValueError(
            f"The provided `peft_type` '{value}' is not compatible with the `PeftMixedModel`; compatible "
            f"types are: {names}. Use a PeftModel (get_peft_model without mixed=True) for {value} adapters.")
    refused = method_view(spec.tuner_cls, nn.Module()).mixed_model_refusals(config)
    if getattr(config, "bias", "none") != "none":
        refused.append(f"bias={config.bias!r}")
    if config.rewrites_base_weights:
        refused.append("an initialisation or option that rewrites the base weights")
    if refused:
        raise NotImplementedError(
            f"{value} adapters in a PeftMixedModel do not support {', '.join(refused)} in fastpeft; set "
            "these options to their defaults, or use a PeftModel for this adapter.")


def method_view(tuner_cls: type[Tuner], model: nn.Module) -> Tuner:
    """An instance of `tuner_cls` over `model` that injects nothing: the mixed tuner asks it for the method's
    hooks. Not a submodule of anything, so the model's parameters are not listed twice."""
    view = tuner_cls.__new__(tuner_cls)
    nn.Module.__init__(view)
    view.model = model
    view.peft_config = {}
    view.active_adapter = []
    view.trainable_adapters = set()
    view.grad_overrides = {}
    return view


def chain_paths(root: nn.Module) -> dict[str, str]:
    """{path of an adapter layer wrapped by another adapter layer: path of the chain's outermost layer}."""
    inner: dict[str, str] = {}
    for name, module in root.named_modules():
        if not isinstance(module, AdapterLayer) or name in inner:
            continue
        path, layer = name, module
        while isinstance(layer.base_layer, AdapterLayer):
            path, layer = f"{path}.base_layer", layer.base_layer
            inner[path] = name
    return inner


def file_keys_for_save(root: nn.Module, tensors: dict) -> dict:
    """Keys of layers inside a chain moved to the chain's path (where the file of one method has them)."""
    inner = chain_paths(root)
    if not inner:
        return tensors
    deepest_first = sorted(inner, key=len, reverse=True)
    out = {}
    for key, value in tensors.items():
        path = next((p for p in deepest_first if key.startswith(p + ".")), None)
        out[key if path is None else inner[path] + key[len(path):]] = value
    return out


class MixedModel(Tuner):
    """Adapters of different mixable methods in one model; `PeftMixedModel.base_model`."""

    def __init__(self, model: nn.Module, config, adapter_name: str = "default", **kwargs) -> None:
        configs = config if isinstance(config, dict) else {adapter_name: config}
        for each in configs.values():
            check_mixable(each)
        self.__dict__["_views"] = {}  # tuner class -> its view (a plain dict: views are no submodules)
        super().__init__(model, configs, adapter_name, **kwargs)

    # ------------------------------------------------------------------ each adapter's own method
    def hooks_for(self, config) -> Tuner:
        tuner_cls = get_spec(config.peft_type).tuner_cls
        view = self._views.get(tuner_cls)
        if view is None:
            view = self._views[tuner_cls] = method_view(tuner_cls, self.model)
        # the adapters of this method only: a method's checks across its adapters never see another's
        view.peft_config = {n: c for n, c in self.peft_config.items()
                            if get_spec(c.peft_type).tuner_cls is tuner_cls}
        view.active_adapter = self.active_adapter
        view.trainable_adapters = set(self.trainable_adapters)
        return view

    def inject_adapter(self, model: nn.Module, adapter_name: str, **options) -> None:
        try:
            check_mixable(self.peft_config[adapter_name])
        except Exception:
            self.peft_config.pop(adapter_name, None)  # nothing was built: the config goes as it came
            raise
        super().inject_adapter(model, adapter_name, **options)

    def check_mergeable(self) -> None:
        for config in self.peft_config.values():
            self.hooks_for(config).check_mergeable()

    def extra_file_state(self, adapter_name: str) -> dict:
        return self.hooks_for(self.peft_config[adapter_name]).extra_file_state(adapter_name)

    def load_extra_file_state(self, adapter_name: str, tensors: dict) -> set[str]:
        return self.hooks_for(self.peft_config[adapter_name]).load_extra_file_state(adapter_name, tensors)

    def convert_loaded_state(self, adapter_name: str, tensors: dict, root: nn.Module) -> dict:
        """File keys at a chain's path moved to the chain layer that holds `adapter_name`, then the
        method's own conversion."""
        holding = {}
        for path, outer in chain_paths(root).items():
            layer = root.get_submodule(path)
            if layer.has_adapter(adapter_name):
                holding[outer] = path
        if holding:
            longest_first = sorted(holding, key=len, reverse=True)
            moved = {}
            for key, value in tensors.items():
                outer = next((o for o in longest_first if key.startswith(o + ".")), None)
                moved[key if outer is None else holding[outer] + key[len(outer):]] = value
            tensors = moved
        config = self.peft_config.get(adapter_name)
        return tensors if config is None else self.hooks_for(config).convert_loaded_state(
            adapter_name, tensors, root)

    def converted_file_state(self, adapter_name, tensors, config_dict, initial_dir):
        raise NotImplementedError(
            "path_initial_model_for_weight_conversion is not supported by PeftMixedModel.")

    # ------------------------------------------------------------------ calls
    def model_forward(self, *args, **kwargs):
        _refuse_adapter_names(kwargs)
        return self.model(*args, **kwargs)

    def model_generate(self, *args, **kwargs):
        _refuse_adapter_names(kwargs)
        return self.model.generate(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model_generate(*args, **kwargs)

    # ------------------------------------------------------------------ activity
    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """As HF PEFT's mixed model: the other active adapters stay active; when none is left, each layer
        still holding adapters activates its first one."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(
                f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
        merged = [n for n in names for layer in self.adapter_layers() if n in layer.merged_adapters]
        if merged:
            raise ValueError(f"Adapter(s) {sorted(set(merged))} are merged into the base weights; call "
                             "unmerge_adapter() before deleting them.")
        for name in names:
            self._remove_adapter(name)
        remaining = [n for n in self.active_adapters if n not in names]
        if not remaining:
            firsts = {_first_adapter(layer) for layer in self.adapter_layers()}
            remaining = sorted(firsts - {None})
            self.trainable_adapters.update(remaining)
        self.active_adapter = remaining
        self._apply_adapter_state()

    def _top_layers(self) -> list[AdapterLayer]:
        """Innermost layer of a chain first: merging a layer after the ones it wraps is the forward's order
        (an OFT layer rotates the input of the whole chain inside it)."""
        return list(reversed(super()._top_layers()))

    def unmerge_adapter(self) -> None:
        for layer in reversed(self._top_layers()):  # outermost first: the reverse of merge_adapter's order
            layer.unmerge()

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"Weighted adapters are not supported for {type(self).__name__} (yet).")


def _first_adapter(layer: AdapterLayer) -> str | None:
    for attr in layer.adapter_param_names:
        for name in getattr(layer, attr).keys():
            return name
    return None


def _refuse_adapter_names(kwargs: dict) -> None:
    if kwargs.get("adapter_names") is not None:
        raise NotImplementedError(
            "adapter_names=[...] (a batch mixing adapters per sample) is not supported by PeftMixedModel; "
            "activate the adapters to combine with set_adapter([...]) instead.")
    kwargs.pop("adapter_names", None)
