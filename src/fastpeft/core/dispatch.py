"""First-match dispatch from a base module to the adapter layer class that wraps it.

Each method owns a `DispatchChain`; quantized backends can `register(..., first=True)` to take precedence.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Matcher = Callable[[nn.Module], bool]


class DispatchChain:
    def __init__(self, method: str) -> None:
        self.method = method
        self._entries: list[tuple[Matcher, type, str]] = []

    def register(self, match: type | tuple[type, ...] | Matcher, layer_cls: type,
                 first: bool = False) -> None:
        if isinstance(match, type) or isinstance(match, tuple):
            types = match if isinstance(match, tuple) else (match,)
            label = "/".join(t.__name__ for t in types)

            def matcher(module: nn.Module, types=types) -> bool:
                return isinstance(module, types)
        else:
            matcher, label = match, getattr(match, "__name__", "custom")
        entry = (matcher, layer_cls, label)
        self._entries.insert(0, entry) if first else self._entries.append(entry)

    def resolve(self, module: nn.Module, name: str) -> type:
        for matcher, layer_cls, _ in self._entries:
            if matcher(module):
                return layer_cls
        supported = ", ".join(label for _, _, label in self._entries)
        raise ValueError(
            f"{self.method} cannot wrap module '{name}' of type {type(module).__name__}; supported types: "
            f"{supported}. Adjust target_modules (or exclude_modules) so it does not match '{name}'."
        )
