"""`AdaLoraCallback`: runs AdaLoRA's rank allocation from transformers' `Trainer` (so it cannot be forgotten).

The Trainer calls `on_optimizer_step` right after `optimizer.step()` and before `zero_grad()`, with
`state.global_step` still the 0-based index of the step just taken: exactly where HF PEFT's docs place
`model.base_model.update_and_allocate(global_step)` in a hand-written loop.

Usage: `Trainer(model=peft_model, ..., callbacks=[AdaLoraCallback()])`. Without it (and without calling
update_and_allocate yourself) training stops with an error once it goes past `tinit`.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def _adalora_tuner(model):
    """The AdaLoraModel inside `model` (a PeftModel, possibly wrapped by accelerate / DDP), or None."""
    from .model import AdaLoraModel

    seen = model
    for _ in range(4):  # DDP / compile wrappers hold the PeftModel as .module / ._orig_mod
        tuner = getattr(seen, "base_model", None)
        if isinstance(tuner, AdaLoraModel):
            return tuner
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            return None
    return None


class AdaLoraCallback(TrainerCallback):
    """Calls `update_and_allocate(state.global_step)` on the trained AdaLoRA model after every optimizer
    step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = _adalora_tuner(model)
        if tuner is None:
            raise ValueError(
                "AdaLoraCallback was given to a Trainer whose model has no AdaLoRA adapter; drop the "
                "callback or build the model with get_peft_model(model, AdaLoraConfig(...))."
            )
        name = tuner.trainable_adapter_name
        total = tuner.peft_config[name].total_step if name is not None else None
        if total is not None and state.max_steps and state.max_steps != total:
            logger.warning("AdaLoraConfig.total_step=%s but the Trainer runs %s steps: the rank budget "
                           "schedule assumes total_step steps.", total, state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        tuner = _adalora_tuner(model)
        if tuner is not None:
            tuner.update_and_allocate(state.global_step)
