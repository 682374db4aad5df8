"""HF PEFT's module path `peft.helpers`. diffusers imports `disable_input_dtype_casting` when it loads."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def disable_input_dtype_casting(model, active: bool = True):
    """Not implemented by fastpeft yet: refused on use rather than entered and ignored."""
    raise NotImplementedError(
        "peft.helpers.disable_input_dtype_casting is not implemented by fastpeft yet (fastpeft's adapter layers "
        "always cast their input to the adapter's dtype). Run without layerwise casting."
    )
    yield  # pragma: no cover
