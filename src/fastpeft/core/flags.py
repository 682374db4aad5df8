"""`ModelFlags`: the bookkeeping fastpeft keeps per `PeftModel`, in one object found by `flags_of`.

Nothing else of fastpeft's is stored on a user's model or a PeftModel: the attributes HF PEFT and transformers
read (`peft_config`, `base_model`, `active_adapter`, ...) are public and stay where they look for them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

_KEY = "_fastpeft_flags"


@dataclass
class ModelFlags:
    # inside `disable_adapter()`: nested blocks leave the adapters to the outermost one
    adapters_disabled: bool = False
    # the first training forward's output reached a trainable adapter parameter: not checked again
    graph_checked: bool = False
    # "no adapter layer ran in this training forward" was logged (once per model)
    skip_logged: bool = False
    # (hook handles, [True per adapter layer that ran]) during a training forward still being checked
    watch: tuple[list, list] | None = None
    # the base model's modules that carry a `gradient_checkpointing` flag (found once: one walk is costly)
    checkpoint_flags: list[nn.Module] | None = None
    # fastpeft called the base model's enable_input_require_grads (once: never a second hook)
    input_grads: bool = False


def flags_of(model: nn.Module) -> ModelFlags:
    """The flags of `model` (a PeftModel), made on first use."""
    flags = model.__dict__.get(_KEY)
    if flags is None:
        flags = model.__dict__[_KEY] = ModelFlags()
    return flags


def copy_flags(source: nn.Module, replica: nn.Module) -> None:
    """Give a replica (nn.DataParallel) its own flags: replicas run their forwards on parallel threads."""
    flags = source.__dict__.get(_KEY)
    if flags is not None:
        replica.__dict__[_KEY] = replace(flags, watch=None)
