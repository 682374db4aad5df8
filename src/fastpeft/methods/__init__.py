"""Adapter methods, one folder each; importing a folder registers its method."""

from . import lora  # noqa: F401
