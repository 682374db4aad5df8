"""All-or-nothing adapter loads: a load that fails leaves the model exactly as it was.

`all_or_nothing(model, source, hub_kwargs, config)` records, before the load, what a load can change: every
module's attributes (children, parameters, buffers, hooks, training flag, per-adapter dicts such as LoRA's `r` /
`scaling`), every parameter's `requires_grad`, the adapter configs and the prompt-method manager; and, when the
new adapter's config rewrites base weights on injection (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ, KaSA), a CPU copy of
the weights it targets. If the load raises, all of that is put back: layers injected for a new adapter disappear
(their parents get the original modules back), a `peft_config` attribute added to the user's model goes, flags and
base weights come back. Adapter tensor values written by a failed load are restored by
`set_peft_model_state_dict` itself (it backs up what it may write). A load nested in another that already covers
it (from_pretrained's load into the PeftModel it builds) records nothing again (`_covered`).

Errors that are not fastpeft's own (a method's loader failing, anything unforeseen) are re-raised as
`AdapterLoadError` naming the adapter file; fastpeft's own errors and OS errors keep their type (they already
name their file) and get a note naming the adapter and saying the model was left unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core import targeting
from ..errors import AdapterLoadError, FastPeftError
from . import io

logger = logging.getLogger(__name__)

_NOTE = "while loading the adapter from"


def _contents(value: Any):
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return set(value)


def _put_back(value: Any, saved) -> None:
    """Give a container its saved contents in place (other objects may hold the same dict / list / set)."""
    if isinstance(value, list):
        value[:] = saved
    else:
        value.clear()
        value.update(saved)


_CONTAINERS = (dict, list, set)


class ObjectState:
    """An object's attributes, one level deep: the attribute dict, and the items of each container value."""

    __slots__ = ("obj", "attrs", "contents", "empty")

    def __init__(self, obj: Any) -> None:
        attrs = vars(obj)
        self.obj = obj
        self.attrs = attrs.copy()
        held = [v for v in attrs.values() if isinstance(v, _CONTAINERS)]
        self.contents = [(v, _contents(v)) for v in held if v]
        self.empty = [v for v in held if not v]  # mostly hook dicts: they only need emptying again, no copy

    def restore(self) -> None:
        attrs = vars(self.obj)
        attrs.clear()
        attrs.update(self.attrs)
        for value, saved in self.contents:
            _put_back(value, saved)
        for value in self.empty:
            if value:
                value.clear()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ModelState:
    """What a load may change in `model` (see the module docstring); `restore()` puts it back."""

    def __init__(self, model: nn.Module) -> None:
        with _gc_paused():  # tens of thousands of small copies: a full collection over a big heap costs ~1 s
            self._record(model)

    def _record(self, model: nn.Module) -> None:
        objects: list[Any] = list(model.modules())
        prompts = model.__dict__.get("_prompts")  # PeftModel's prompt-method manager (not a module)
        if prompts is not None:
            objects.append(prompts)
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict):
            objects.extend(c for c in configs.values() if hasattr(c, "__dict__"))
        self.objects = [ObjectState(obj) for obj in objects]
        # every parameter of the tree sits in some module's _parameters: no second walk (a shared one twice is fine)
        self.grads = [(p, p.requires_grad) for state in self.objects
                      for p in state.attrs.get("_parameters", {}).values() if p is not None]
        # ids of the tensors the model held before the load (this record keeps them alive, so ids stay unique)
        self.tensor_ids = {id(t) for state in self.objects for key in ("_parameters", "_buffers")
                           for t in state.attrs.get(key, {}).values() if t is not None}

    def holds(self, obj: Any) -> bool:
        """Whether `obj` is one of the recorded objects."""
        return any(state.obj is obj for state in self.objects)

    def restore(self) -> None:
        for state in self.objects:
            state.restore()
        for param, flag in self.grads:
            param.requires_grad_(flag)


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


def base_weights_backup(model: nn.Module, config) -> list:
    """(tensor, CPU copy) of the base weights injecting `config` may rewrite: its target modules' tensors (every
    base tensor when the targets are not a plain list / regex, e.g. 'all-linear')."""
    if config is None or not config.rewrites_base_weights:  # e.g. PiSSA, as HF PEFT on load too
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = getattr(config, "target_modules", None)
    if targets is None or targets == "all-linear":
        modules = [base]
    else:
        modules = [m for name, m in base.named_modules() if name and targeting.is_target(config, name)]
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return [(t, t.detach().to("cpu", copy=True)) for t in tensors.values()]


def restore_values(backup: list) -> None:
    with torch.no_grad():
        for tensor, copy in backup:
            tensor.copy_(copy)


# Loads running in this thread (or task), outermost first: (model, its ModelState).
_OPEN: contextvars.ContextVar[tuple[tuple[nn.Module, ModelState], ...]] = contextvars.ContextVar(
    "fastpeft_open_loads", default=())


def _covered(model: nn.Module) -> bool:
    """Whether an enclosing load already puts back all that a failed load into `model` can change.

    True for the load that `PeftModel.from_pretrained(base, ...)` makes into the PeftModel it has just built around
    `base`: the enclosing load recorded `base` (the whole user model), and the PeftModel, which it did not record,
    is never handed out when the load fails; the error passes through the enclosing load, which restores `base`.
    Not recording twice saves a walk over every module, new adapter layers included (~20 ms at 4000 modules).
    """
    get_base = getattr(model, "get_base_model", None)
    if not _OPEN.get() or not callable(get_base):
        return False
    base = get_base()
    return any(outer is base and not state.holds(model) for outer, state in _OPEN.get())


def tensors_before_load(model: nn.Module) -> set[int] | None:
    """ids of the tensors `model` held when the innermost running load into it (or around its base) began; None
    outside such a load. Only these can keep a value a failed load wrote: the others (an adapter the load
    created) are dropped from the model when the load rolls back."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else None
    for outer, state in reversed(_OPEN.get()):
        if outer is model or outer is base:
            return state.tensor_ids
    return None


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, model_id, hub_kwargs: dict[str, Any], config=None) -> Iterator[None]:
    """Run a load of `model_id` (adding an adapter with `config`, if given) into `model`; if it raises, restore
    `model` and name the file in the error."""
    state = None if _covered(model) else ModelState(model)
    values = base_weights_backup(model, config)
    token = None if state is None else _OPEN.set((*_OPEN.get(), (model, state)))
    try:
        yield
    except BaseException as err:
        if state is not None:
            state.restore()
        restore_values(values)
        if not isinstance(err, Exception):  # KeyboardInterrupt etc.: restored, re-raised as is
            raise
        if any(_NOTE in note for note in getattr(err, "__notes__", ())):
            raise  # an inner load (from_pretrained -> load_adapter) already named the file
        source = io.where(model_id, hub_kwargs.get("subfolder"))
        if isinstance(err, _KEEP_TYPE):  # names its file, or out of memory (callers retry on it): keep the type
            err.add_note(f"({_NOTE} {source}; the model was left unchanged)")
            raise
        wrapped = _wrapped(err, adapter_file(model_id, hub_kwargs))
        wrapped.add_note(f"({_NOTE} {source})")
        raise wrapped from err
    finally:
        if token is not None:
            _OPEN.reset(token)


# errors passed through with a note instead of becoming AdapterLoadError
_KEEP_TYPE = (FastPeftError, OSError, MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


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
        logger.warning("Keys in %s not used by adapter '%s': %s", model_id, adapter_name, result.unexpected_keys)
    if result.missing_keys:
        logger.warning("Adapter weights missing from %s (left at init): %s", model_id, result.missing_keys)
