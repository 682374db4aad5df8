"""The method registry: one `MethodSpec` per adapter method, keyed by `PeftType`.

Everything generic (config loading, model building, checkpoint keys) looks methods up here instead of
branching on method names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import PeftType


@dataclass(frozen=True)
class MethodSpec:
    """What the generic code needs to know about one method.

    `prefix`: the start of every adapter parameter name of the method (e.g. "lora_"), used to tell adapter
    keys in HF-PEFT checkpoints; `tuner_cls`: the `Tuner` subclass that injects the method's layers. The spec
    is where a method states its type and prefix: `register` copies them onto its config and tuner classes.
    """

    peft_type: PeftType
    config_cls: type
    prefix: str
    tuner_cls: type | None = None
    prompt_cls: type | None = None
    hotswap: object | None = None  # the method's hot-swap rules (hotswap.SwapRule); None: no hot-swapping
    # adapters of this method may share one model with other mixable methods' (PeftMixedModel, mixing/)
    mixable: bool = False


_REGISTRY: dict[PeftType, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if _REGISTRY.get(spec.peft_type, spec) != spec:  # the same spec again (a re-import) is fine
        raise ValueError(f"Method {spec.peft_type.value} is registered twice.")
    if spec.tuner_cls is not None:  # first: a refused spec leaves the registry and its classes as they were
        _give_prefix(spec.tuner_cls, spec.prefix)
    _REGISTRY[spec.peft_type] = spec
    spec.config_cls.PEFT_TYPE = spec.peft_type.value
    return spec


def _give_prefix(tuner_cls: type, prefix: str) -> None:
    """The tuner reads its parameter prefix as a class attribute; a class that states its own must agree with
    the spec (a subclass of another method's tuner gets its own copy, not the parent's)."""
    own = tuner_cls.__dict__.get("prefix")
    if own is not None and own != prefix:
        raise ValueError(
            f"{tuner_cls.__name__}.prefix is {own!r} but its method is registered with {prefix!r}.")
    tuner_cls.prefix = prefix


def get_spec(peft_type: str | PeftType) -> MethodSpec:
    known = ", ".join(sorted(p.value for p in _REGISTRY))
    try:
        return _REGISTRY[PeftType(peft_type)]
    except ValueError:  # not a PeftType value at all (a typo, or a newer library's method)
        raise ValueError(
            f"peft_type {peft_type!r} is not a method type fastpeft knows (known: {known}); was the folder "
            "written by a newer library?") from None
    except KeyError:
        raise ValueError(
            f"peft_type {PeftType(peft_type).value!r} is not supported by fastpeft yet (supported: {known})."
        ) from None


def registered() -> dict[PeftType, MethodSpec]:
    return dict(_REGISTRY)


def is_method_config(obj: object) -> bool:
    """Whether `obj` is a config object of a registered method (its spec's config class or a subclass): what
    generic code accepts where a config is expected (a dict, or another library's config, is not one)."""
    peft_type = getattr(obj, "peft_type", None)
    spec = _REGISTRY.get(peft_type) if isinstance(peft_type, str) else None
    return spec is not None and isinstance(obj, spec.config_cls)
