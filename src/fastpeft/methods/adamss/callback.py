"""`AdamssAsaCallback`: runs AdaMSS's adaptive subspace allocation from transformers' `Trainer`.

The Trainer calls `on_optimizer_step` right after `optimizer.step()` and before `zero_grad()` (the gradients
are still there), with `state.global_step` the 0-based index of the step just taken: where a hand-written loop
calls `model.base_model.update_and_allocate(global_step)`. Everything ASA needs is read from the adapter's
AdamssConfig; the callback has no options.

Usage: `Trainer(model=peft_model, ..., callbacks=[AdamssAsaCallback()])`; importable as in HF PEFT from
`peft.tuners.adamss.asa_callback`.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def _adamss_tuner(model):
    """The AdamssModel inside `model` (a PeftModel, the tuner itself, or either wrapped by DDP / compile), or
    None."""
    from .model import AdamssModel

    seen = model
    for _ in range(4):
        if isinstance(seen, AdamssModel):
            return seen
        tuner = getattr(seen, "base_model", None)
        if isinstance(tuner, AdamssModel):
            return tuner
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            return None
    return None


class AdamssAsaCallback(TrainerCallback):
    """Calls `update_and_allocate(state.global_step)` on the trained AdaMSS model after every optimizer
    step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = _adamss_tuner(model)
        if tuner is None:
            raise ValueError("AdamssAsaCallback was given to a Trainer whose model has no AdaMSS adapter; "
                             "drop the callback or build the model with get_peft_model(model, "
                             "AdamssConfig(...)).")
        if not any(tuner.peft_config[n].use_asa for n in tuner.active_adapters):
            logger.warning("AdamssAsaCallback: no active AdaMSS adapter has use_asa=True, so no subspace "
                           "will be pruned.")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        tuner = _adamss_tuner(model)
        if tuner is not None:
            tuner.update_and_allocate(state.global_step)
