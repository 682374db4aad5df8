"""HF PEFT's module path `peft.helpers`. diffusers imports `disable_input_dtype_casting` when it loads (its layerwise
casting wraps each adapter layer's forward in it); the code lives in fastpeft.core.input_casting."""

from .core.input_casting import disable_input_dtype_casting

__all__ = ["disable_input_dtype_casting"]
