"""``fastpeft inspect ADAPTER``: what an adapter folder holds (method, base, targets, ranks, norms, sizes).

LoRA layers are described from their weight shapes (rank) and ``||B @ A|| * scaling``; every other tensor
is listed with its shape and Frobenius norm. Works for adapters written by fastpeft or HF PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.targeting import pattern_value
from ..methods.lora.config import lora_scaling
from .common import CliError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def adapter_files(folder: str) -> tuple[Path, Path]:
    """``(config, weights)`` of an adapter folder; a ``CliError`` names what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise CliError(f"adapter folder {folder!r} not found")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise CliError(f"{folder!r} is not an adapter folder: it has no {CONFIG_NAME}")
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return config, path / name
    raise CliError(f"adapter folder {folder!r} has no weights ({' or '.join(WEIGHT_NAMES)})")


def read_config(config_path: Path) -> dict:
    """The adapter config through fastpeft's checked reader (size bound, UTF-8 JSON object)."""
    from fastpeft.checkpoint.validate import read_config_json
    from fastpeft.errors import FastPeftError

    try:
        data = read_config_json(config_path)
    except FastPeftError as exc:
        raise CliError(str(exc)) from None
    if "peft_type" not in data:
        raise CliError(f"{config_path} has no 'peft_type'; it is not an adapter config")
    return data


def load_tensors(weights: Path) -> dict:
    from fastpeft.checkpoint.io import load_peft_weights

    return load_peft_weights(str(weights.parent))


def _lora_scaling(config: dict, module: str, rank: int) -> float:
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
    return lora_scaling(alpha, rank, bool(config.get("use_rslora")))


def _module_name(key: str, part: str) -> str:
    """``base_model.model.x.q_proj.lora_A.weight`` -> ``x.q_proj``."""
    name = key.split(f".{part}")[0]
    return name.removeprefix("base_model.model.")


def lora_layers(config: dict, tensors: dict) -> tuple[list[dict], set[str]]:
    """One row per LoRA pair: module, rank, shapes and ``||B @ A|| * scaling``; plus the keys used."""
    rows, used = [], set()
    for key in sorted(tensors):
        for a_part, b_part in LORA_PAIRS:
            if f".{a_part}." not in key:
                continue
            b_key = key.replace(f".{a_part}.", f".{b_part}.")
            if b_key not in tensors:
                continue
            a, b = tensors[key].float(), tensors[b_key].float()
            module, rank = _module_name(key, a_part), a.shape[0]
            delta = b.reshape(b.shape[0], -1) @ a.reshape(rank, -1)
            scaling = _lora_scaling(config, module, rank)
            rows.append({"module": module, "rank": rank, "scaling": scaling, "A": list(a.shape),
                         "B": list(b.shape), "delta_norm": delta.norm().item() * scaling})
            used |= {key, b_key}
    return rows, used


def tensor_rows(tensors: dict, skip: set[str]) -> list[dict]:
    return [{"name": key, "shape": list(t.shape), "numel": t.numel(), "norm": t.float().norm().item()}
            for key, t in sorted(tensors.items()) if key not in skip]


LAYER_DESCRIBERS = {"LORA": lora_layers}
"""peft_type -> function(config, tensors) -> (layer rows, keys described); others list tensors only."""


def _targets(config: dict, layers: list[dict]):
    targets = config.get("target_modules")
    if targets is None and layers:
        targets = sorted({row["module"].rsplit(".", 1)[-1] for row in layers})
    return targets


def describe(folder: str) -> dict:
    """Everything ``inspect`` reports, as a JSON-ready dict."""
    config_path, weights = adapter_files(folder)
    config = read_config(config_path)
    tensors = load_tensors(weights)
    describer = LAYER_DESCRIBERS.get(str(config["peft_type"]).upper())
    layers, used = describer(config, tensors) if describer else ([], set())
    ranks = sorted({row["rank"] for row in layers})
    return {"adapter": str(Path(folder).resolve()), "method": config["peft_type"],
            "base_model": config.get("base_model_name_or_path"), "task": config.get("task_type"),
            "target_modules": _targets(config, layers), "modules_to_save": config.get("modules_to_save"),
            "ranks": ranks, "num_parameters": sum(t.numel() for t in tensors.values()),
            "weights_file": weights.name, "file_size_bytes": weights.stat().st_size,
            "layers": layers, "tensors": tensor_rows(tensors, used)}


def _print_text(info: dict) -> None:
    rows = [("adapter", info["adapter"]), ("method", info["method"]), ("base model", info["base_model"]),
            ("task", info["task"]), ("target modules", info["target_modules"]),
            ("modules to save", info["modules_to_save"]), ("ranks", info["ranks"] or "-"),
            ("parameters", f"{info['num_parameters']:,}"),
            ("file", f"{info['weights_file']} ({info['file_size_bytes'] / 1e6:.3f} MB)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if info["layers"]:
        print(f"\n{'layer':<48} {'rank':>4} {'scaling':>8} {'||B@A||*s':>10}")
        for row in info["layers"]:
            print(f"{row['module']:<48} {row['rank']:>4} {row['scaling']:>8.3g} {row['delta_norm']:>10.4g}")
    if info["tensors"]:
        print(f"\n{'tensor':<60} {'shape':>14} {'norm':>10}")
        for row in info["tensors"]:
            print(f"{row['name']:<60} {'x'.join(map(str, row['shape'])):>14} {row['norm']:>10.4g}")


def run_inspect(args) -> int:
    """The ``inspect`` subcommand; returns the exit code."""
    info = describe(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_text(info)
    return 0
