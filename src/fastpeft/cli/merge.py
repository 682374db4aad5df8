"""``fastpeft merge BASE ADAPTER OUT``: fold an adapter into its base model and save a plain transformers
model.

The base class follows the adapter's ``task_type`` (or ``auto_mapping``); OUT gets the merged weights and the
tokenizer (the adapter's, else the base's), never adapter files. A non-empty OUT needs ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.atomic import replace_folder
from .common import CliError, auto_class_for, read_labels, setup_runtime
from .inspect_adapter import adapter_files, read_config

LABELS_FILE = "labels.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _is_inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(out: Path, overwrite: bool, protected: list[str]) -> None:
    """Refuse a file, a non-empty folder (without --overwrite), or a folder holding the inputs."""
    if out.exists() and not out.is_dir():
        raise CliError(f"OUT {str(out)!r} is a file, not a folder")
    for item in protected:
        source = Path(item).resolve()
        if source.exists() and _is_inside(source, out.resolve()):
            raise CliError(f"OUT {str(out)!r} would overwrite the input {item!r}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"OUT {str(out)!r} exists and is not empty; pass --overwrite to replace it")


def _label_kwargs(adapter: str) -> dict:
    """num_labels / id2label from the labels.json that ``fastpeft train`` writes for classification."""
    file = Path(adapter) / LABELS_FILE
    if not file.is_file():
        return {}
    names = read_labels(file)
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}, "ignore_mismatched_sizes": True}


def load_merged(base_path: str, adapter: str, config: dict, safe_merge: bool):
    """Base model + adapter, merged and unloaded into a plain transformers model."""
    from fastpeft import PeftModel

    base_cls = auto_class_for(config.get("task_type"), config.get("auto_mapping"))
    try:
        base = base_cls.from_pretrained(base_path, **_label_kwargs(adapter))
    except (OSError, ValueError) as exc:
        raise CliError(f"BASE {base_path!r} could not be loaded with {base_cls.__name__}: {exc}") from None
    try:
        model = PeftModel.from_pretrained(base, adapter)
        return model.merge_and_unload(safe_merge=safe_merge)
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"cannot merge {adapter!r} into {base_path!r}: {exc}") from None


def _tokenizer(adapter: str, base_path: str):
    """The adapter folder's tokenizer if it ships one, else the base's; None when neither loads."""
    from transformers import AutoTokenizer

    sources = [adapter] if any((Path(adapter) / f).is_file() for f in TOKENIZER_FILES) else []
    for source in [*sources, base_path]:
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    return None


def run_merge(args) -> int:
    """The ``merge`` subcommand; returns the exit code."""
    config = read_config(adapter_files(args.adapter)[0])
    out = Path(args.out)
    check_output(out, args.overwrite, [args.base, args.adapter])
    setup_runtime()
    merged = load_merged(args.base, args.adapter, config, args.safe_merge)
    tokenizer = _tokenizer(args.adapter, args.base)

    def fill(folder: Path) -> None:
        merged.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    # built beside OUT, fsynced, swapped in whole: a crash never leaves half an export
    replace_folder(out, fill)
    print(f"merged {config['peft_type']} adapter {args.adapter} into {args.base}; saved to {out}"
          + ("" if tokenizer is not None else " (no tokenizer found to copy)"))
    return 0
