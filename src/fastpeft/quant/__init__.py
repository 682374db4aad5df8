"""Helpers for adapters on quantised base layers (bitsandbytes in `bnb.py`; imported lazily)."""
