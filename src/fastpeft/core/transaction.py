"""One all-or-nothing mechanism for every change fastpeft makes to a model: injecting an adapter, loading one,
writing a state dict into it, merging into quantised weights.

A change runs inside `with Transaction(model) as tx:` in three phases, in this order:
1. checks: everything that can be refused without touching the model (names, configs, targets, shapes);
2. build: new objects that the model does not reach yet (adapter layers, file tensors);
3. swap: the model is changed.
Before a step changes something, it tells the open transaction how to take that back:
- `tx.on_failure(step)`: an undo step, e.g. delete the adapter the change created, take back a merge. Steps
  run last-in first-out.
- `tx.keep_values(tensors)`: tensors whose values the change may rewrite in place (the base weights of a
  base-rewriting init, the adapter tensors a state-dict write fills). Each is copied once and put back, also
  across the meta / real boundary or to its old shape (`swap_in`).
- `Transaction(model, record_state=True)` (loads): the attributes of every module and of the given objects
  (configs, a prompt-method manager), their containers and every parameter's requires_grad, recorded once
  before anything runs (`ModelState`); a failure puts all of it back, so layers injected for a new adapter
  disappear and flags come back. Tensors made after this record need no copy: the restored modules drop them.
If the block raises (any exception, KeyboardInterrupt included), the steps run, the values come back, then the
recorded state; the error goes on unchanged (a failing undo step adds a note to it).

The cyclic garbage collector is paused while a root transaction is open: a load builds thousands of small
objects (modules, dicts, records), and on a model that already holds ~15k modules each automatic full
collection walks that whole heap (about a quarter of a load's time with 60 adapters in a 48-layer model).
Reference counting still frees everything; the collector resumes, as it was, when the change ends.

Nested transactions record nothing twice. A transaction opened while another covers its model joins it: its
undo steps and copies go to the outermost one (`root`), which alone records module state; a tensor already
copied, or made after the root's record, is not copied again. A joined transaction that fails takes back what
it added itself at once (its caller may go on), and the root takes back the rest if the error reaches it. A
transaction covers a model it was opened on, one whose modules its root recorded, and a wrapper (`PeftModel`)
built during it around either: such a wrapper is never handed out when the change fails.
"""

from __future__ import annotations

import contextvars
import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .module_walk import all_modules, per_adapter_dicts

_CONTAINERS = (dict, list, set)
_NONE: dict = {}


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


def _is_torch_nn(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def _plain_adapter_leaves(modules: list[nn.Module]) -> dict[int, nn.Module]:
    """The per-adapter entries of adapter layers (entries of an `AdapterLayer`'s nn.ModuleDict children)
    that are childless torch.nn modules (LoRA's A / B nn.Linear, its dropout): a change reaches only their
    tensors' values (copied with `keep_values`, swapped in place), their flags and their training mode,
    never their other attributes."""
    out = {}
    for module in modules:
        for container in per_adapter_dicts(module):
            for leaf in container._modules.values():
                if leaf is not None and not leaf._modules and _is_torch_nn(leaf):
                    out[id(leaf)] = leaf
    return out


class ModelState:
    """Every module of `model` and each of `extra` (one level deep), and every parameter's requires_grad.
    Plain per-adapter leaves (`_plain_adapter_leaves`) get their tensors and training mode recorded, not
    their attributes: with 100 LoRA adapters they are all but ~300 of the ~13k modules."""

    def __init__(self, model: nn.Module, extra: Iterable[Any] = ()) -> None:
        modules = all_modules(model)
        leaves = _plain_adapter_leaves(modules)
        # tens of thousands of small copies: the transaction has paused the collector (module docstring)
        self.objects = [ObjectState(obj) for obj in [*modules, *extra] if id(obj) not in leaves]
        self.modes = [(leaf, leaf.training) for leaf in leaves.values()]
        self.ids = {id(state.obj) for state in self.objects} | leaves.keys()
        held = [(state.attrs.get("_parameters", _NONE), state.attrs.get("_buffers", _NONE))
                for state in self.objects]
        held += [(leaf._parameters, leaf._buffers) for leaf in leaves.values()]
        # every parameter of the tree sits in some module's _parameters: no second walk (one shared is
        # listed twice, which is harmless). tensor_ids: the tensors held before the change (this record
        # keeps them alive, so ids stay unique). One pass for both: ~15k modules after 100 adapters.
        self.grads: list[tuple[nn.Parameter, bool]] = []
        self.tensor_ids: set[int] = set()
        for params, buffers in held:
            for param in params.values():
                if param is not None:
                    self.grads.append((param, param.requires_grad))
                    self.tensor_ids.add(id(param))
            for buffer in buffers.values():
                if buffer is not None:
                    self.tensor_ids.add(id(buffer))

    def holds(self, obj: Any) -> bool:
        return id(obj) in self.ids

    def restore(self) -> None:
        for state in self.objects:
            state.restore()
        for leaf, mode in self.modes:
            leaf.training = mode
        for param, flag in self.grads:
            param.requires_grad_(flag)


def swap_in(tensor: torch.Tensor, data: torch.Tensor) -> None:
    """Give `tensor` (same Python object: modules, caches and optimizers keep their reference) `data`, also
    across the meta / real boundary where `.data =` refuses."""
    if isinstance(tensor, nn.Parameter):
        data = nn.Parameter(data, requires_grad=tensor.requires_grad)
    torch.utils.swap_tensors(tensor, data)


def _put_values_back(values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, copy in reversed(values):
            if copy.is_meta != tensor.is_meta or copy.shape != tensor.shape:
                # a meta-built weight the change had filled, or one a method resized for a file, goes back
                swap_in(tensor, copy if copy.is_meta or tensor.is_meta else copy.to(tensor.device))
            else:
                tensor.copy_(copy)


# Transactions open in this thread (or task), outermost first.
_OPEN: contextvars.ContextVar[tuple[Transaction, ...]] = contextvars.ContextVar("fastpeft_transactions",
                                                                                 default=())


def _covers(outer: Transaction, model: nn.Module) -> bool:
    if outer.model is model:
        return True
    state = outer.root.state
    if state is None:
        return False
    if state.holds(model):
        return True
    # a wrapper built during `outer`, around what it recorded
    get_base = getattr(model, "get_base_model", None)
    return callable(get_base) and (get_base() is outer.model or state.holds(get_base()))


def enclosing(model: nn.Module) -> Transaction | None:
    """The innermost open transaction that covers `model`, if any."""
    return next((outer for outer in reversed(_OPEN.get()) if _covers(outer, model)), None)


class Transaction:
    """See the module docstring. `record_state`: record the module state of `model` (and of `extra`) unless an
    enclosing transaction covers `model`."""

    def __init__(self, model: nn.Module, record_state: bool = False, extra: Iterable[Any] = ()) -> None:
        self.model = model
        self._record_state, self._extra = record_state, extra
        self.root: Transaction = self
        self.state: ModelState | None = None
        self.undo: list[Callable[[], Any]] = []
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.copied: set[int] = set()
        self._marks = (0, 0)
        self._token: contextvars.Token | None = None
        self._gc_was_enabled = False

    @property
    def joined(self) -> bool:
        return self.root is not self

    def __enter__(self) -> Transaction:
        outer = enclosing(self.model)
        if outer is not None:
            self.root = outer.root
            self._marks = (len(self.root.undo), len(self.root.values))
        else:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                if self._record_state:
                    self.state = ModelState(self.model, self._extra)
            except BaseException:
                if self._gc_was_enabled:
                    gc.enable()
                raise
        self._token = _OPEN.set((*_OPEN.get(), self))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _OPEN.reset(self._token)
        try:
            if exc_type is not None:
                self._roll_back(exc)
            elif not self.joined:  # committed: drop the copies now rather than with the last reference
                self.undo, self.values, self.copied, self.state = [], [], set(), None
        finally:
            if self._gc_was_enabled:
                gc.enable()
        return False

    # ---- declaring what a failure takes back
    def on_failure(self, step: Callable[[], Any]) -> None:
        """Run `step` if the transaction fails (after the steps declared later)."""
        self.root.undo.append(step)

    def keep_values(self, tensors: Iterable[torch.Tensor], device: str | torch.device | None = None) -> None:
        """Copy `tensors` (to `device`, default: where they are) so a failure puts their values back; tensors
        already copied or made after the root's module record are skipped."""
        root = self.root
        made_before = None if root.state is None else root.state.tensor_ids
        for tensor in tensors:
            key = id(tensor)
            if key in root.copied or (made_before is not None and key not in made_before):
                continue
            root.copied.add(key)
            data = tensor.detach()
            # a meta tensor has no values to move: its copy stays meta
            copy = data.clone() if device is None or data.is_meta else data.to(device, copy=True)
            root.values.append((tensor, copy))

    # ---- taking back
    def _roll_back(self, exc: BaseException | None) -> None:
        root = self.root
        undo_from, values_from = self._marks
        steps, root.undo[undo_from:] = root.undo[undo_from:], []
        values, root.values[values_from:] = root.values[values_from:], []
        root.copied.difference_update(id(tensor) for tensor, _ in values)
        failures = []
        for step in reversed(steps):
            try:
                step()
            except Exception as err:  # the other steps and the restores still run
                failures.append(f"{type(err).__name__}: {err}")
        _put_values_back(values)
        if self.state is not None:
            self.state.restore()
        if failures and exc is not None:
            exc.add_note("(taking the change back also failed in: " + "; ".join(failures) + ")")
