"""`ShadowCache`: the base model's KV cache and the shadow backbone's, as one transformers `Cache`.

Incremental decoding advances two models: the base model (its keys / values computed under injection) and
the shadow backbone (which computes s0 for the new tokens). `generate` threads one cache object through its
steps, so the pair travels as one: changes of batch or length layout (reset, reorder for beams, crop,
repeat, select) go to both; everything else (length queries, mask sizes, layer access) is the base cache's.
The tuner unpacks it before the base model runs, so the base model only ever sees its own cache.
"""

from __future__ import annotations

from typing import Any

from transformers import Cache

# Cache methods that change the batch or sequence layout: applied to both caches
_BOTH = ("reset", "reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices")


class ShadowCache(Cache):
    """`base`: the base model's cache; `shadow`: the shadow backbone's (None if it returned none)."""

    def __init__(self, base: Any = None, shadow: Any = None) -> None:
        # Cache.__init__ is not called: the storage stays in the two wrapped caches (its signature also
        # changes between transformers versions)
        self.base = base
        self.shadow = shadow

    def __getattr__(self, name: str) -> Any:  # attributes Cache does not define: the base cache's
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def __len__(self) -> int:
        return 0 if self.base is None else len(self.base)

    def __getitem__(self, layer_idx: int) -> Any:
        return self.base[layer_idx]

    def __iter__(self):
        return iter(self.base)

    def __repr__(self) -> str:
        return f"ShadowCache(base={self.base!r}, shadow={self.shadow!r})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.base is None else self.base.get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False  # two caches of different layouts are not one static layout

    def to_legacy_cache(self):
        raise NotImplementedError("A ShadowCache holds two caches; it has no single legacy tuple form.")

    @classmethod
    def from_legacy_cache(cls, past_key_values=None):
        raise NotImplementedError("A ShadowCache is built from a base cache and a shadow cache, not a tuple.")


def _to_both(name: str):
    def method(self, *args, **kwargs):
        result = None
        for cache in (self.base, self.shadow):
            fn = getattr(cache, name, None) if cache is not None else None
            if fn is not None:
                out = fn(*args, **kwargs)
                result = out if cache is self.base else result
        return result

    method.__name__ = name
    return method


def _to_base(name: str, value: Any):
    if isinstance(value, property):
        return property(lambda self: getattr(self.base, name))

    def method(self, *args, **kwargs):
        return getattr(self.base, name)(*args, **kwargs)

    method.__name__ = name
    return method


def _install() -> None:
    """Every public member of this transformers version's `Cache` is routed: the layout changes to both
    caches, the rest to the base cache (unless ShadowCache defines it above)."""
    for name, value in vars(Cache).items():
        if name.startswith("_") or name in vars(ShadowCache):
            continue
        if name in _BOTH:
            setattr(ShadowCache, name, _to_both(name))
        elif isinstance(value, property) or (
                callable(value) and not isinstance(value, (classmethod, staticmethod))):
            setattr(ShadowCache, name, _to_base(name, value))


_install()
