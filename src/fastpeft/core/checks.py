"""Guards against training mistakes that HF PEFT lets pass silently.

Each guard either fixes the problem (and logs what it did) or stops with an error that names the problem and
the fix. A few checks only warn by default; `strict()` (or FASTPEFT_STRICT=1) turns those warnings into
errors. The switch lives in the process, never in adapter_config.json, so files stay identical to HF PEFT's.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ..errors import AdapterConfigError, AdapterStateError
from .flags import ModelFlags, flags_of

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ strict mode
_STRICT: ContextVar[bool | None] = ContextVar("fastpeft_strict", default=None)
_LOADING_FILE: ContextVar[bool] = ContextVar("fastpeft_loading_file", default=False)


def is_strict() -> bool:
    """True inside `strict()`, after `set_strict(True)`, or with the environment variable
    FASTPEFT_STRICT=1."""
    value = _STRICT.get()
    if value is None:
        return os.environ.get("FASTPEFT_STRICT", "").strip().lower() in ("1", "true", "yes")
    return value


def set_strict(enabled: bool = True) -> None:
    """Process-wide (per context): make fastpeft's safety warnings errors (`enabled=True`) or warnings
    again."""
    _STRICT.set(bool(enabled))


@contextmanager
def strict(enabled: bool = True):
    """`with fastpeft.strict(): ...` - safety warnings raised inside the block become errors."""
    token = _STRICT.set(bool(enabled))
    try:
        yield
    finally:
        _STRICT.reset(token)


@contextmanager
def loading_file():
    """Marks config checks made while an adapter is loaded from a file (they warn there: the weights
    decide)."""
    token = _LOADING_FILE.set(True)
    try:
        yield
    finally:
        _LOADING_FILE.reset(token)


def is_loading_file() -> bool:
    return _LOADING_FILE.get()


def warn_or_raise(message: str, error_cls: type[Exception] = AdapterConfigError) -> None:
    """A UserWarning by default; `error_cls` in strict mode."""
    if is_strict():
        raise error_cls(message + " (raised because fastpeft strict mode is on)")
    warnings.warn(message, UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------ 0 trainable
NO_TRAINABLE_NOTICE = (
    "WARNING: this model has NO trainable parameters, so training it changes nothing. An adapter loaded with "
    "PeftModel.from_pretrained(..., is_trainable=False) (the default) is frozen: load it with "
    "is_trainable=True, or call model.set_requires_grad(adapter_name) / model.set_adapter(adapter_name) to "
    "train it."
)


def _any_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def _check_something_trains(model) -> None:
    """A training forward (train mode, grad enabled) of a model whose adapters were loaded frozen."""
    if getattr(model.tuner, "trainable_adapters", True) or _any_trainable(model):
        return
    raise AdapterStateError(
        "Training forward on a model with 0 trainable parameters: the model is in train() mode with "
        f"gradients enabled, but adapter(s) {sorted(model.peft_config)} are frozen (loaded with "
        "is_trainable=False?). To train, load with PeftModel.from_pretrained(..., is_trainable=True) or call "
        "model.set_requires_grad(adapter_name). For inference, call model.eval() or run under "
        "torch.no_grad()."
    )


# ---------------------------------------------------------------------------------------------- checkpointing
def _checkpointing(base: nn.Module, flags: ModelFlags) -> bool:
    """transformers' own test (any submodule with `gradient_checkpointing` on), without its deprecation
    warning.

    Runs on every training forward: the modules that have the flag at all (the model and its decoder layers;
    what `gradient_checkpointing_enable` sets) are found by one walk and kept in `flags`, so later calls read
    only those (one walk over a 32-layer model with LoRA layers costs ~6 ms, reading the flags of its 33
    modules ~10 us)."""
    holders = flags.checkpoint_flags
    if holders is None:
        holders = flags.checkpoint_flags = [m for m in base.modules() if hasattr(m, "gradient_checkpointing")]
    return any(getattr(m, "gradient_checkpointing", False) is True for m in holders)


def ensure_input_grads(base: nn.Module, flags: ModelFlags) -> None:
    """With activation checkpointing on, make the embeddings' output require grad (once).

    Reentrant checkpointing gives no gradient to the parameters inside a checkpointed block when none of its
    inputs requires grad, which is the case with frozen embeddings. transformers only fixes this for models
    whose main input is `input_ids`; this covers the rest (vision, audio) and models checkpointed after
    wrapping.
    """
    enable = getattr(base, "enable_input_require_grads", None)
    done = ("_require_grads_hooks", "_require_grads_hook")  # what transformers 5, 4 record
    if enable is None or flags.input_grads or any(key in base.__dict__ for key in done) \
            or not _checkpointing(base, flags):
        return
    enable()
    flags.input_grads = True  # once: never a second hook, whatever transformers records
    logger.info("Activation checkpointing is on: made the input embeddings' output require grad so the "
                "adapters inside checkpointed blocks get gradients (enable_input_require_grads).")


def _distributed() -> bool:
    """FSDP / DeepSpeed keep parameters in flat or partitioned buffers: the graph check cannot see them."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def before_training_forward(model) -> bool:
    """Called by PeftModel.forward. Returns True when the output's graph still has to be checked (once)."""
    if not model.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    flags = flags_of(model)
    ensure_input_grads(model.get_base_model(), flags)
    _check_something_trains(model)
    if flags.graph_checked or _distributed():
        return False
    _watch_adapter_layers(model)
    return True


def _watch_adapter_layers(model) -> None:
    """Until the graph check passes: note whether any adapter layer runs in this forward (a batch may skip the
    adapted branch of a multimodal model, which is no reason to fail). Hooks only on these few forwards."""
    ran: list[bool] = []
    layers = getattr(model.tuner, "adapter_layers", None)
    handles = [layer.register_forward_hook(lambda *_: ran.append(True))
               for layer in layers()] if layers else []
    flags_of(model).watch = (handles, ran)


def stop_watching(model) -> list[bool]:
    """Remove the hooks `before_training_forward` set; returns whether adapter layers ran (a non-empty
    list)."""
    flags = flags_of(model)
    handles, ran = flags.watch or ((), [])
    flags.watch = None
    for handle in handles:
        handle.remove()
    return ran


def _grad_tensor(output) -> torch.Tensor | None:
    """The loss if the output has one, else its first tensor that requires grad."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    loss = output.get("loss") if isinstance(output, dict) else None
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    values = output.values() if isinstance(output, dict) else \
        output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)


def _trainable_adapter_parameters(model) -> list[torch.Tensor]:
    layers = getattr(model.tuner, "adapter_layers", None)
    if layers is None:  # prompt methods: their encoder is the whole adapter, a frozen input never hides it
        return []
    names = getattr(model.tuner, "trainable_adapters", ())
    return [p for layer in layers() for name in names
            for _, p in layer.adapter_parameters(name) if p.requires_grad]


def _graph_reaches(tensor: torch.Tensor, wanted: set[int]) -> bool:
    """Does backward from `tensor` reach a leaf in `wanted` (ids)? A reentrant checkpoint node re-runs its
    block in backward, hiding what is inside: reaching one counts as yes."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in wanted or "Checkpoint" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def check_output_graph(model, output):
    """First training forward: the output must depend on some trainable adapter parameter (else the adapters
    get no gradient, silently in HF PEFT: typically reentrant checkpointing over blocks whose inputs need no
    grad)."""
    ran = stop_watching(model)
    tensor = _grad_tensor(output)
    params = _trainable_adapter_parameters(model) if tensor is not None else []
    if not params:
        return output
    if not _graph_reaches(tensor, {id(p) for p in params}):
        # no adapter layer ran: this batch skipped them (checked again on the next training forward)
        if not ran:
            if not flags_of(model).skip_logged:
                flags_of(model).skip_logged = True
                logger.warning("No adapter layer ran in this training forward: this batch gives the %d "
                               "trainable adapter parameters no gradient.", len(params))
            return output
        raise AdapterStateError(
            f"This training forward's output does not depend on any of the {len(params)} trainable adapter "
            "parameters, so backward would give them no gradient. Usual cause: reentrant activation "
            "checkpointing (use_reentrant=True) over blocks whose inputs do not require grad (frozen "
            "embeddings). Fix: call base_model.enable_input_require_grads(), or use "
            "gradient_checkpointing_kwargs={'use_reentrant': False}."
        )
    flags_of(model).graph_checked = True
    return output


# -------------------------------------------------------------------------------------------------- new heads
_HEADS_BY_CLASS = (("ForSequenceClassification", ("score", "classifier")),
                   ("ForTokenClassification", ("score", "classifier")),
                   ("ForQuestionAnswering", ("qa_outputs",)),
                   ("ForMultipleChoice", ("classifier",)))


def _embedding_names(model: nn.Module) -> set[str]:
    """Input / output embeddings: resize_token_embeddings renews them; save_embedding_layers saves them."""
    wanted = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            wanted.add(id(getattr(model, getter)()))
        except (AttributeError, NotImplementedError, TypeError):
            continue
    return {n for n, m in model.named_modules() if id(m) in wanted}


def _fresh_modules(model: nn.Module) -> list[str]:
    """Modules transformers initialised instead of loading. transformers >= 5 flags every loaded parameter
    with `_is_hf_initialized`; with no flag anywhere (built from a config, older transformers) fall back to
    the task heads of the model's class."""
    params = list(model.named_parameters())
    flags = [getattr(p, "_is_hf_initialized", False) is True for _, p in params]
    if any(flags):
        # meta weights (offloaded by a device_map, loaded on use) were neither loaded nor randomly initialised
        fresh = {n.rpartition(".")[0] for (n, p), loaded in zip(params, flags)
                 if not loaded and not p.is_meta}
        return sorted(fresh - _embedding_names(model))
    cls = type(model).__name__
    heads = next((h for suffix, h in _HEADS_BY_CLASS if cls.endswith(suffix)), ())
    return [h for h in heads if isinstance(getattr(model, h, None), nn.Module)]


def _saved(name: str, modules_to_save) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def check_new_heads(model: nn.Module, config) -> None:
    """Warn (strict: raise) when freshly initialised modules would be neither trained nor saved with the
    adapter."""
    saved = getattr(config, "modules_to_save", None)
    fresh = [n for n in _fresh_modules(model) if n and not _saved(n, saved)]
    if not fresh:
        return
    kinds = {n: type(model.get_submodule(n)).__name__ for n in fresh}
    warn_or_raise(
        f"Module(s) {kinds} of {type(model).__name__} are newly initialised (random, not loaded from a "
        "checkpoint) but not in modules_to_save: they stay frozen at random values and are not saved with "
        f"the adapter, so a reload gets different random values. Add them: modules_to_save={sorted(fresh)!r} "
        "(or set the config's task_type, e.g. 'SEQ_CLS', which adds the classification head)."
    )


# ---------------------------------------------------------------------------------------------- empty tensors
def refuse_empty_tensors(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Partitioned parameters (DeepSpeed ZeRO-3, FSDP without a full state dict) show up as shape-(0,)
    tensors. (A matrix with a 0-sized dimension is real: AdaLoRA prunes whole layers to rank 0.)"""
    empty = sorted(k for k, t in tensors.items() if t.dim() == 1 and t.numel() == 0)
    if not empty:
        return
    shown = empty[:8] + (["..."] if len(empty) > 8 else [])
    raise AdapterStateError(
        f"Refusing to save adapter '{adapter_name}': {len(empty)} tensor(s) are empty placeholders (shape "
        f"(0,)): {shown}. The parameters are partitioned across processes (DeepSpeed ZeRO-3 / FSDP), so this "
        "process only sees placeholders. Pass the gathered weights: save_pretrained(..., "
        "state_dict=trainer.accelerator.get_state_dict(model)) (Trainer does this), or gather them under "
        "deepspeed.zero.GatheredParameters."
    )


# -------------------------------------------------------------------------------------------------- eval mode
def _tuner_modules(peft_model) -> Iterator[nn.Module]:
    yield peft_model
    if peft_model.base_model is not peft_model.get_base_model():
        yield peft_model.base_model  # the Tuner between PeftModel and the user's model


def follow_base_mode(peft_model) -> None:
    """New adapter modules take the user's model's train / eval mode (HF PEFT leaves them in train mode)."""
    training = peft_model.get_base_model().training
    for module in _tuner_modules(peft_model):
        module.training = training
    encoders = peft_model.__dict__.get("_modules", {}).get("prompt_encoder")
    if encoders is not None:
        encoders.train(training)
