"""`install_as_peft()`: make `import peft` (and HF PEFT's module paths) resolve to fastpeft in this process.

transformers, diffusers, TRL and accelerate reach PEFT only through `import peft`, `peft.<module path>` and
the installed package's metadata (`importlib.metadata.version("peft")`). After the switch:
- `sys.modules["peft"]` is a module holding fastpeft's public names (its own module object, so
  `peft.__version__` can answer for the PEFT API level while `fastpeft.__version__` stays fastpeft's), with a
  spec (transformers' `is_peft_available` uses `importlib.util.find_spec`) and an empty `__path__`;
- `peft.<path>` for every path in `MODULE_PATHS` is the fastpeft module of the same path (real modules:
  fastpeft/tuners/..., fastpeft/utils/...);
- any other `peft.<path>` fails with an ImportError that names it as an entry point fastpeft does not serve;
- `importlib.metadata` finds a `peft` distribution of version `PEFT_API_VERSION` before any installed one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import types

# The PEFT API level fastpeft reports. transformers 5.x gates its adapter API (add_adapter, set_adapter,
# enable/disable_adapters, active_adapters, get_adapter_state_dict, delete_adapter) behind 0.22.0; fastpeft
# serves every peft entry point those call (docs/ecosystem.md lists them and where each is served).
PEFT_API_VERSION = "0.22.0"

# HF PEFT module paths (below `peft.`) that exist as fastpeft modules of the same path
MODULE_PATHS = (
    "auto", "config", "functional", "helpers", "mixed_model", "optimizers", "peft_model",
    "tuners", "tuners.tuners_utils", "tuners.lora.config", "tuners.lora.layer", "tuners.lora.model",
    "tuners.loha.layer", "tuners.lokr.layer", "tuners.adamss.asa_callback", "tuners.cartridge.utils",
    "tuners.mixed.model",
    "utils", "utils.constants", "utils.error", "utils.hotswap", "utils.merge_utils", "utils.other",
    "utils.save_and_load", "utils.transformers_weight_conversion",
)


def module_paths() -> list[str]:
    """MODULE_PATHS plus `tuners.<method>` for every method package, parents before children."""
    import pkgutil

    from . import tuners

    methods = [f"tuners.{info.name}" for info in pkgutil.iter_modules(tuners.__path__) if info.ispkg]
    return sorted(set(MODULE_PATHS) | set(methods), key=lambda p: (p.count("."), p))


class _PeftDistribution(importlib.metadata.Distribution):
    """The `peft` package record transformers / diffusers / accelerate read the version from."""

    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return (f"Metadata-Version: 2.1\nName: peft\nVersion: {PEFT_API_VERSION}\n"
                    "Summary: fastpeft serving the peft API (fastpeft.install_as_peft)\n")
        return None

    def locate_file(self, path):
        return path


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Answers for the `peft` distribution, and refuses `peft.*` modules fastpeft does not provide."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname.startswith("peft.") and fullname not in sys.modules:
            raise ModuleNotFoundError(
                f"{fullname} is an HF PEFT module that fastpeft does not provide (fastpeft.install_as_peft() "
                "is active). docs/ecosystem.md lists the peft module paths and names fastpeft serves.",
                name=fullname,
            )
        return None

    def find_distributions(self, context=None):
        if context is None or context.name in (None, "peft"):
            yield _PeftDistribution()


_FINDER = _PeftFinder()


def _alias_module() -> types.ModuleType:
    import fastpeft

    module = types.ModuleType("peft", "fastpeft, serving as peft (fastpeft.install_as_peft)")
    # names fastpeft imports lazily (AdaLoraCallback imports transformers) are left to __getattr__: importing
    # transformers before `peft` exists would cache its "PEFT is not installed" answer
    module.__dict__.update({name: vars(fastpeft)[name] for name in fastpeft.__all__
                            if name in vars(fastpeft)})
    module.__version__ = PEFT_API_VERSION
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec("peft", None, is_package=True)
    module.__getattr__ = lambda name: getattr(fastpeft, name)  # lazily imported names (AdaLoraCallback)
    module.__fastpeft_alias__ = True
    return module


def is_installed() -> bool:
    return getattr(sys.modules.get("peft"), "__fastpeft_alias__", False) is True


def install_as_peft() -> None:
    """From now on, in this process, `import peft` is fastpeft (idempotent). Call it before importing
    transformers' Trainer, diffusers or TRL: they import peft when they load."""
    if is_installed():
        return
    other = sys.modules.get("peft")
    if other is not None:
        raise RuntimeError(
            f"install_as_peft(): a different 'peft' module was already imported in this process "
            f"({getattr(other, '__file__', other)!r}). Call fastpeft.install_as_peft() before anything "
            "imports peft (put it first in your script)."
        )
    module = _alias_module()
    # `peft` exists before the submodules are imported: one of them imports transformers
    # (tuners.adamss.asa_callback), which caches its "is PEFT installed" answer on first use
    sys.meta_path.insert(0, _FINDER)
    sys.modules["peft"] = module
    try:
        submodules = {path: importlib.import_module(f"fastpeft.{path}") for path in module_paths()}
    except BaseException:
        del sys.modules["peft"]
        sys.meta_path.remove(_FINDER)
        raise
    for path, submodule in submodules.items():
        sys.modules[f"peft.{path}"] = submodule
        parent, _, leaf = path.rpartition(".")
        setattr(sys.modules[f"peft.{parent}"] if parent else module, leaf, submodule)
