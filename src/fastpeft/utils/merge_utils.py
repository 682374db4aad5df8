"""HF PEFT's module path `peft.utils.merge_utils`: its five merge functions, with its parameter names
(fastpeft.merging holds the code)."""

from ..merging import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties  # noqa: F401
