"""HF PEFT's `targeted_module_names` / `targeted_parameter_names` on a tuner: where the adapters sit, the
quick check that `target_modules` / `target_parameters` matched what was meant."""

from __future__ import annotations

from .layer import AdapterLayer

_WRAPPED = ".base_layer"


def _outer_path(name: str) -> str:
    """A layer wrapped by another adapter layer sits at `<path>.base_layer[.base_layer ...]`: `<path>`."""
    while name.endswith(_WRAPPED):
        name = name[: -len(_WRAPPED)]
    return name


class TargetReport:
    """Read from the layers in the model now, in module order (HF PEFT lists them in injection order and
    keeps names of deleted adapters' modules)."""

    def _layer_paths(self) -> list[tuple[str, AdapterLayer]]:
        return [(_outer_path(name), layer) for name, layer in self.holders()
                if isinstance(layer, AdapterLayer) and not layer.nested]

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths of the modules that hold adapters (layers on a single parameter are listed below)."""
        paths = [path for path, layer in self._layer_paths() if layer.parameter_name is None]
        return list(dict.fromkeys(paths))

    @property
    def targeted_parameter_names(self) -> list[str]:
        """`<module path>.<parameter>` of each parameter adapted on its own (`target_parameters`)."""
        keys = [f"{path}.{layer.parameter_name}" for path, layer in self._layer_paths()
                if layer.parameter_name is not None]
        return list(dict.fromkeys(keys))
