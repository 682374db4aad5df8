"""Helpers shared by the subcommands: the user-error type, argparse value types, quiet offline runtime."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A problem with the user's input; ``main`` prints the message and exits with code 2."""


def write_text(path: str | Path, text: str) -> None:
    """Write a small output file atomically: a temp file in the same folder, fsynced, renamed over `path`."""
    from ..checkpoint import atomic, io

    atomic.write_files([(path, io.text_writer(text))])


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)`` with its files committed atomically (saved to a temp folder
    first)."""
    import shutil
    import tempfile

    from ..checkpoint import atomic

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        atomic.write_files([(Path(folder) / p.name, lambda dst, src=p: shutil.copyfile(src, dst))
                            for p in files])


def read_json_file(path: Path, what: str, fix: str) -> Any:
    """A JSON file the CLI wrote earlier (`what` it holds); unreadable or invalid -> CliError with `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"{path} ({what}) is not readable JSON ({exc}); {fix}") from None


def read_labels(path: Path) -> list[str]:
    """The class names in the ``labels.json`` that ``fastpeft train`` writes for classification."""
    data = read_json_file(path, "class labels", "re-run `fastpeft train` or delete the file")
    names = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CliError(f"{path} must hold {{\"labels\": [names...]}} (as `fastpeft train` writes it); re-run "
                       "`fastpeft train` or delete the file")
    return names


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
