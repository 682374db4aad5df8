"""Helpers shared by the subcommands: the user-error type, argparse value types, quiet offline runtime."""

from __future__ import annotations

import argparse
import os


class CliError(Exception):
    """A problem with the user's input; ``main`` prints the message and exits with code 2."""


def positive_int(text: str) -> int:
    """argparse type for integers >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type for floats > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def setup_runtime() -> None:
    """Offline hub by default and quiet transformers logging (no progress bars of its own)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


TASKS = {
    "causal-lm": ("CAUSAL_LM", "AutoModelForCausalLM"),
    "seq-cls": ("SEQ_CLS", "AutoModelForSequenceClassification"),
    "token-cls": ("TOKEN_CLS", "AutoModelForTokenClassification"),
    "seq2seq-lm": ("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
    "question-ans": ("QUESTION_ANS", "AutoModelForQuestionAnswering"),
    "feature-extraction": ("FEATURE_EXTRACTION", "AutoModel"),
}
"""CLI task name -> (``TaskType`` value, transformers Auto class)."""


def auto_class_for(task_type: str | None, auto_mapping: dict | None = None):
    """The transformers class that loads a base model for ``task_type`` (or the config's ``auto_mapping``)."""
    import importlib

    import transformers

    for value, auto_name in TASKS.values():
        if value == task_type:
            return getattr(transformers, auto_name)
    mapping = auto_mapping or {}
    if mapping.get("parent_library") and mapping.get("base_model_class"):
        from fastpeft.checkpoint.validate import check_import_allowlist

        try:  # the adapter file names the package: import only known ones (as AutoPeftModel, HF PEFT)
            check_import_allowlist(mapping["parent_library"])
        except ValueError as exc:
            raise CliError(f"{exc} (The CLI has no such option: load this adapter from Python.)") from None
        return getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"])
    return transformers.AutoModel
