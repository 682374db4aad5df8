"""The seams between the generic code and the methods, declared in one place.

`AdapterManager` is what `PeftModel` (and checkpoint/keys.py) call on `PeftModel.tuner`: `core.tuner.Tuner`
for layer methods, `core.prompt_adapters.PromptAdapters` for prompt methods; both satisfy it, so the callers
need no branch on the kind of method. What a method adds beyond it, the generic code reads from declarations
(class attributes such as `call_keywords`, config field metadata), never from the method's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..registry import registered

if TYPE_CHECKING:
    from ..config import PeftConfig


@runtime_checkable
class AdapterManager(Protocol):
    """Manages the adapters of one model: configs, activation, forward / generate calls, files, merging."""

    model: nn.Module
    peft_config: dict[str, PeftConfig]
    active_adapter: str | list[str]

    @property
    def active_adapters(self) -> list[str]: ...

    def inject_adapter(self, model: nn.Module, adapter_name: str, **options: Any) -> None: ...

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    def holders(self) -> Iterator[tuple[str, nn.Module]]: ...

    def adapters_disabled(self) -> AbstractContextManager[None]: ...

    def mixed_batch(self, adapter_names: list[str] | None) -> AbstractContextManager[None]: ...

    def model_forward(self, *args: Any, **kwargs: Any) -> Any: ...

    def model_generate(self, *args: Any, **kwargs: Any) -> Any: ...

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]: ...

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]: ...

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None: ...

    def unmerge_adapter(self) -> None: ...

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module: ...

    def unload(self) -> nn.Module: ...


_call_keywords: tuple[int, frozenset[str]] = (-1, frozenset())


def method_call_keywords() -> frozenset[str]:
    """Forward keywords that some registered method reads from a call (its tuner's or prompt class's
    `call_keywords`). HF PEFT's PeftModel takes each of them whatever the method; where the model's method
    does not read one it is dropped, not passed to the base model."""
    global _call_keywords
    specs = registered()
    if _call_keywords[0] != len(specs):  # registering is add-only: the count tells a change
        classes = [c for spec in specs.values() for c in (spec.tuner_cls, spec.prompt_cls) if c is not None]
        _call_keywords = (len(specs), frozenset(k for c in classes for k in getattr(c, "call_keywords", ())))
    return _call_keywords[1]
