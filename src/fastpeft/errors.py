"""fastpeft's exception types.

Every error fastpeft raises on bad user input or bad files derives from `FastPeftError`, so callers (and the
fuzz tests) can tell "fastpeft refused this" from a crash. Each also derives from the builtin type HF PEFT
raises in the same situation (`ValueError`, `FileNotFoundError`, ...), so code written against HF PEFT keeps
catching it.
"""

from __future__ import annotations


class FastPeftError(Exception):
    """Base class of every error fastpeft raises on purpose."""


class AdapterConfigError(FastPeftError, ValueError):
    """An adapter config (object or `adapter_config.json`) is invalid: wrong type, unknown value, absurd
    size."""


class AdapterLoadError(FastPeftError, ValueError):
    """Adapter weights cannot be loaded into the model: corrupt file, missing / unexpected keys, wrong
    shapes."""


class AdapterFileNotFoundError(FastPeftError, FileNotFoundError, ValueError):
    """An adapter folder or Hub repo lacks a file it must have (ValueError too, as HF PEFT raises)."""


class AdapterShapeError(AdapterLoadError, RuntimeError):
    """File tensors whose shapes differ from the model's (RuntimeError too: torch's load_state_dict raises
    it)."""


class UnsafeAdapterFileError(AdapterLoadError):
    """A file would need code execution (pickle), escapes its folder (path / symlink) or declares absurd
    sizes."""


class AdapterNameError(FastPeftError, ValueError):
    """An adapter name that cannot be used: empty, path-like, or clashing with parameter prefixes / reserved
    names."""


class AdapterStateError(FastPeftError, RuntimeError):
    """The model is in a state where the call would silently do the wrong thing (e.g. training 0
    parameters)."""


class LossyMergeError(FastPeftError, ValueError):
    """Merging into quantised weights would change the layer's outputs by more than the allowed error."""


class NoMatchingPeftModuleError(FastPeftError, ValueError):
    """The config's target_modules (or the state dict given to inject_adapter_in_model) select no module."""


# HF PEFT's names (peft.utils.error): code that catches PeftError catches every fastpeft error
PeftError = FastPeftError
