"""Make transformers' `Trainer` and TRL's trainers treat fastpeft models as PEFT models (adapter files,
resume).

They recognise PEFT models with `isinstance(model, peft.PeftModel)`, so by default a fastpeft model is saved
whole. We rebind a few module-level names of theirs to wrappers that also accept fastpeft models; see
`enable_trainer_support`.

Who needs it: users who do NOT call `fastpeft.install_as_peft()` (HF PEFT installed next to fastpeft, or no
`peft` at all). With `install_as_peft()`, `peft.PeftModel` is fastpeft's class and
`peft.tuners.tuners_utils.BaseTunerLayer` a base of fastpeft's adapter layers, so the trainers' own checks
(and accelerate's `is_peft_model`) already answer yes: nothing is patched then (`fastpeft_serves_as_peft`).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from typing import Any

# Why rebinding names (and not subclassing `Trainer` or asking users to call something):
# - it keeps the drop-in promise: user code written for HF PEFT runs unchanged, with or without `peft`
#   installed;
# - the recognition sits in a handful of module-level names, listed below, each wrapped to answer "yes" for a
#   fastpeft `PeftModel` and to defer to the original otherwise (so HF PEFT models behave exactly as before);
# - nothing is patched at `import fastpeft`: `PeftModel.__init__` calls `enable_trainer_support()`, which
#   patches the listed modules already imported and, for the others, patches each one right after it is first
#   imported (a meta-path finder that reacts to those module names only), so import order does not matter;
# - it is idempotent: a name already holding one of our wrappers is left alone; a name reset by someone else
#   (for example a test's monkeypatch) is wrapped again on the next call.
#
# TRL's SFTTrainer asks `accelerate.utils.is_peft_model` (imported by name) to decide where to attach its
# fused LM head: on `model.get_base_model()` for PEFT models, else on the model itself (which breaks on a
# wrapper). We rebind that name in TRL's modules only, plus `BaseTunerLayer` (its "adapter on lm_head" check;
# absent without HF PEFT). Deliberately NOT patched: accelerate's own `is_peft_model` -- its FSDP helpers then
# call HF PEFT functions.

MARK = "__fastpeft_patch__"

# module -> names rebound in it. `_is_peft_model` is the Trainer's test (several modules import it by name);
# `PeftModel` / `is_peft_available` in `transformers.trainer` build the class list that `Trainer._save`
# accepts.
TARGETS: dict[str, tuple[str, ...]] = {
    "transformers.trainer_utils": ("_is_peft_model",),
    "transformers.trainer": ("_is_peft_model", "PeftModel", "is_peft_available"),
    "transformers.integrations.neftune": ("_is_peft_model",),
    "trl.trainer.sft_trainer": ("is_peft_model", "BaseTunerLayer"),
    "trl.trainer.base_trainer": ("is_peft_model",),
    # the preference / RL trainers: with a PEFT model and no ref_model they use the adapter-disabled model
    # as the reference (else they load a second full model)
    "trl.trainer.dpo_trainer": ("is_peft_model", "BaseTunerLayer"),
    "trl.trainer.kto_trainer": ("is_peft_model", "BaseTunerLayer"),
    "trl.trainer.grpo_trainer": ("is_peft_model", "BaseTunerLayer"),
    "trl.trainer.rloo_trainer": ("is_peft_model", "BaseTunerLayer"),
    "trl.trainer.reward_trainer": ("is_peft_model",),
    "trl.trainer.distillation_trainer": ("is_peft_model", "BaseTunerLayer"),
}

_lock = threading.RLock()


def fastpeft_serves_as_peft() -> bool:
    """Whether `fastpeft.install_as_peft()` is active: then the trainers recognise fastpeft models
    unpatched."""
    from ..peft_alias import is_installed

    return is_installed()


def is_fastpeft_model(model: Any) -> bool:
    from ..peft_model import PeftModel

    return isinstance(model, PeftModel)


class _Classes(tuple):
    """A tuple of classes (valid as `isinstance`'s second argument) that records that we built it."""


def _mark(obj: Any, original: Any) -> Any:
    setattr(obj, MARK, True)
    obj.__wrapped__ = original
    return obj


def _wrap_is_peft_model(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def _is_peft_model(model: Any) -> bool:
        return is_fastpeft_model(model) or original(model)

    return _mark(_is_peft_model, original)


def _wrap_accelerate_is_peft_model(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def is_peft_model(model: Any) -> bool:
        from accelerate.utils import extract_model_from_parallel

        return is_fastpeft_model(extract_model_from_parallel(model)) or original(model)

    return _mark(is_peft_model, original)


def _class_list(original: Any, ours: type) -> _Classes:
    classes = _Classes(([] if original is None else [original]) + [ours])
    return _mark(classes, original)


def _wrap_peft_model_class(original: Any) -> _Classes:
    from ..peft_model import PeftModel

    return _class_list(original, PeftModel)


def _wrap_tuner_layer_class(original: Any) -> _Classes:
    from ..core.layer import AdapterHolder

    return _class_list(original, AdapterHolder)


def _wrap_is_peft_available(original: Callable[[], bool] | None) -> Callable[[], bool]:
    # Read only by `Trainer._save` (with `PeftModel` above) and `_push_from_checkpoint` (copy adapter files):
    # with fastpeft loaded a PEFT implementation is available, whether or not HF PEFT is installed.
    def is_peft_available() -> bool:
        return True

    return _mark(is_peft_available, original)


# name -> (wrapper factory, whether to add the name when the module lacks it, e.g. HF PEFT not installed)
_WRAPPERS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "_is_peft_model": (_wrap_is_peft_model, False),
    "is_peft_model": (_wrap_accelerate_is_peft_model, False),
    "PeftModel": (_wrap_peft_model_class, True),
    "BaseTunerLayer": (_wrap_tuner_layer_class, True),
    "is_peft_available": (_wrap_is_peft_available, False),
}


def patch_module(module: Any) -> None:
    """Rebind the names `TARGETS` lists for `module` (by `__name__`) to fastpeft-aware wrappers, once."""
    names = TARGETS.get(getattr(module, "__name__", ""), ())
    if names and fastpeft_serves_as_peft():
        return  # `peft` is fastpeft: the module's own names already recognise fastpeft models
    with _lock:
        for name in names:
            current = getattr(module, name, None)
            if getattr(current, MARK, False):
                continue
            wrap, add_missing = _WRAPPERS[name]
            if current is None and not add_missing:
                continue  # a version without this name: nothing to extend
            setattr(module, name, wrap(current))


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then `patch_module`; anything else is delegated to the real loader."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        patch_module(module)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a `TARGETS` module it asks the other finders and wraps the loader they
    return."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TARGETS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def _install_finder() -> None:
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


def enable_trainer_support() -> None:
    """Let transformers' `Trainer` (and trainers built on it, e.g. TRL's) handle fastpeft models as PEFT
    models.

    Effects once active: `save_model` and checkpoints write the adapter files only, `resume_from_checkpoint`
    and `load_best_model_at_end` load them back with `load_adapter`, dataset columns follow the base model's
    `forward`. Called by `PeftModel.__init__`; cheap and idempotent, safe to call again. A no-op while
    fastpeft serves as `peft` (`install_as_peft()`): the trainers need no patch then.
    """
    if fastpeft_serves_as_peft():
        return
    with _lock:
        for name in TARGETS:
            module = sys.modules.get(name)
            if module is not None:
                patch_module(module)
        _install_finder()
