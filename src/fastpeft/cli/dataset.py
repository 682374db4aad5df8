"""Training data for ``fastpeft train``: JSONL / JSON / CSV / TSV rows checked for the task's columns.

Columns: ``text`` for causal LM; ``text`` and ``label`` (int or string) for sequence classification.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .common import CliError

COLUMNS = {"CAUSAL_LM": ("text",), "SEQ_CLS": ("text", "label")}
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def required_columns(task_type: str) -> tuple[str, ...]:
    if task_type not in COLUMNS:
        supported = ", ".join(t.lower().replace("_", "-") for t in COLUMNS)
        raise CliError(f"fastpeft train supports the tasks {supported} (got {task_type.lower()})")
    return COLUMNS[task_type]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise CliError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    data = json.loads(text)
    if not all(isinstance(row, dict) for row in data):
        raise CliError(f"{path}: expected a JSON list of objects")
    return data


def _read_delimited(path: Path) -> list[dict]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def read_rows(path_text: str, what: str = "DATA") -> list[dict]:
    """All rows of the file; a missing, empty or unknown-format file is a ``CliError`` naming it."""
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"{what} file {path_text!r} not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CliError(f"{what} file {path_text!r}: unsupported format {suffix or '(none)'}; use "
                       f"{', '.join(SUFFIXES)}")
    reader = {".jsonl": _read_jsonl, ".json": _read_json}.get(suffix, _read_delimited)
    rows = reader(path)
    if not rows:
        raise CliError(f"{what} file {path_text!r} is empty (no rows)")
    return rows


def check_columns(rows: list[dict], columns: tuple[str, ...], path: str) -> None:
    """Every row must have a non-empty value in every required column."""
    for number, row in enumerate(rows, start=1):
        for column in columns:
            if row.get(column) in (None, ""):
                found = ", ".join(sorted(row)) or "(none)"
                raise CliError(f"column {column!r} missing in {path} (row {number}); columns found: {found}")


def load_examples(path: str, task_type: str, what: str = "DATA") -> tuple[list[str], list | None]:
    """``(texts, labels)`` of the file; ``labels`` is None for causal LM."""
    columns = required_columns(task_type)
    rows = read_rows(path, what)
    check_columns(rows, columns, path)
    texts = [str(row["text"]) for row in rows]
    labels = [row["label"] for row in rows] if "label" in columns else None
    return texts, labels


def label_names(labels: list) -> list[str]:
    """Ordered class names: integer labels 0..max keep their numbers, other labels are sorted."""
    as_text = [str(label).strip() for label in labels]
    if all(t.lstrip("-").isdigit() for t in as_text):
        values = sorted({int(t) for t in as_text})
        if values[0] < 0:
            raise CliError(f"integer labels must be >= 0 (found {values[0]})")
        return [str(i) for i in range(values[-1] + 1)]
    return sorted(set(as_text))
