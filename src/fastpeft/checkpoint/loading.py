"""All-or-nothing adapter loads: a load that fails leaves the model exactly as it was.

`all_or_nothing(model, source, hub_kwargs)` runs a load as one transaction (core/transaction.py) that records,
before the load, what a load can change: every module's attributes (children, parameters, buffers, hooks,
training flag, per-adapter dicts such as `r` / `scaling`), every parameter's `requires_grad`, the adapter
configs and the prompt-method manager. If the load raises, all of that is put back: layers injected for a new
adapter disappear (their parents get the original modules back), a `peft_config` attribute added to the user's
model goes, flags come back. The steps inside the load join that transaction and declare what else they
rewrite: the injection copies the base weights an init rewrites (`PeftConfig.rewrites_base_weights`),
`set_peft_model_state_dict` the adapter tensors it fills. A load nested in another that already covers it
(from_pretrained's load into the PeftModel it builds) records nothing again.

Errors that are not fastpeft's own (a method's loader failing, anything unforeseen) are re-raised as
`AdapterLoadError` naming the adapter file; fastpeft's own errors and OS errors keep their type (they already
name their file) and get a note naming the adapter and saying the model was left unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.transaction import Transaction
from ..errors import AdapterLoadError, FastPeftError
from . import io

logger = logging.getLogger(__name__)

_NOTE = "while loading the adapter from"


def adapter_file(model_id, hub_kwargs: dict[str, Any]) -> str:
    """The weights file a load reads (for messages): its path when found, else the folder / repo."""
    for name in (io.SAFETENSORS_WEIGHTS_NAME, io.WEIGHTS_NAME):
        try:
            path = io.resolve_file(model_id, name, **dict(hub_kwargs))
        except Exception:  # only for a message: never mask the original error
            path = None
        if path is not None:
            return path
    return io.where(model_id, hub_kwargs.get("subfolder"))


def _objects_beside_modules(model: nn.Module) -> list[Any]:
    """What a load may change besides the module tree: the adapter configs and a manager of adapters that is
    not a module (prompt methods' `PeftModel.tuner`)."""
    extra: list[Any] = []
    tuner = getattr(model, "tuner", None)
    if tuner is not None and not isinstance(tuner, nn.Module):
        extra.append(tuner)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        extra.extend(c for c in configs.values() if hasattr(c, "__dict__"))
    return extra


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, model_id, hub_kwargs: dict[str, Any]) -> Iterator[None]:
    """Run a load of `model_id` into `model` as one transaction; if it raises, `model` is restored and the
    error names the file."""
    try:
        with Transaction(model, record_state=True, extra=_objects_beside_modules(model)):
            yield
    except Exception as err:
        if any(_NOTE in note for note in getattr(err, "__notes__", ())):
            raise  # an inner load (from_pretrained -> load_adapter) already named the file
        source = io.where(model_id, hub_kwargs.get("subfolder"))
        # names its file, or out of memory (callers retry on it): keep the type
        if isinstance(err, _KEEP_TYPE):
            err.add_note(f"({_NOTE} {source}; the model was left unchanged)")
            raise
        wrapped = _wrapped(err, adapter_file(model_id, hub_kwargs))
        wrapped.add_note(f"({_NOTE} {source})")
        raise wrapped from err


# errors passed through with a note instead of becoming AdapterLoadError
_KEEP_TYPE = (FastPeftError, OSError, MemoryError,
              getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def _wrapped(err: Exception, path: str) -> AdapterLoadError:
    wrapped = AdapterLoadError(
        f"Could not load the adapter from {path}: {type(err).__name__}: {err}. The model was left unchanged; "
        "re-save the adapter with save_pretrained (the file may be damaged or made for another model)."
    )
    wrapped.report = getattr(err, "report", None)
    return wrapped


def warn_about(result, model_id, adapter_name: str) -> None:
    """Non-strict loads: log what did not fit, per module (as HF PEFT warns)."""
    if result.unexpected_keys:
        logger.warning("Keys in %s not used by adapter "
                       "'%s': %s", model_id, adapter_name, result.unexpected_keys)
    if result.missing_keys:
        logger.warning("Adapter weights missing from %s (left at init): %s", model_id, result.missing_keys)
