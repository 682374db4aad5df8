"""HF PEFT's module path `peft.tuners.adamss.asa_callback` (imports transformers, as there)."""

from ...methods.adamss.callback import AdamssAsaCallback

__all__ = ["AdamssAsaCallback"]
