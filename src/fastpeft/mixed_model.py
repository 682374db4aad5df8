"""HF PEFT's module path `peft.mixed_model`. transformers imports `PeftMixedModel` for its isinstance
checks."""

from __future__ import annotations


class PeftMixedModel:
    """Adapters of several methods in one model: not implemented by fastpeft yet (refused when built)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "PeftMixedModel (adapters of different methods in one model, get_peft_model(..., mixed=True)) is "
            "not implemented by fastpeft yet; use one method per model (fastpeft.PeftModel)."
        )
