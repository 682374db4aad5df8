"""HF PEFT's module path `peft.helpers` (code: core/input_casting.py, core/adapter_scale.py, config.py).

diffusers imports `disable_input_dtype_casting` when it loads (its layerwise casting wraps each adapter
layer's forward in it)."""

from .config import PeftConfig
from .core.adapter_scale import rescale_adapter_scale
from .core.input_casting import disable_input_dtype_casting


def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether `model_name_or_path` (a folder or Hub repo) holds an adapter config fastpeft can read."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # any reason it is not a readable adapter: not a PEFT model
        return False
    return True


__all__ = ["check_if_peft_model", "disable_input_dtype_casting", "rescale_adapter_scale"]
