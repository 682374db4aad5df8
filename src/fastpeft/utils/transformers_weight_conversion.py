"""HF PEFT's module path `peft.utils.transformers_weight_conversion` (code:
integrations/transformers_loading.py)."""

from ..integrations.transformers_loading import build_peft_weight_mapping  # noqa: F401
