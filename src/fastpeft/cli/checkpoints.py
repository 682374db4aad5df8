"""Per-epoch checkpoints of ``fastpeft train`` (``OUTPUT/checkpoints/epoch-K``) and the run record.

A checkpoint holds the adapter (``save_pretrained``) plus ``trainer_state.pt``: every trainable tensor,
the optimizer state, torch's RNG state, the step counter and the loss history; resuming restores all of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .common import CliError, read_json_file, write_text

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
RESUME_EXEMPT = ("epochs", "output_dir", "resume")


def epoch_dirs(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("epoch-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(RESUME_EXEMPT))
    return [k for k in keys if old.get(k) != new.get(k)]


def prepare_output(out: Path, run: dict, resume: bool) -> Path | None:
    """Check the output folder against ``--resume``; returns the checkpoint to resume from (or None)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--output-dir {str(out)!r} is a file")
    previous = epoch_dirs(out)
    if previous and not resume:
        raise CliError(f"--output-dir {str(out)!r} already holds a training run ({previous[-1].name}); "
                       "pass --resume to continue it or choose another --output-dir")
    run_file = out / RUN_FILE
    if resume and previous and run_file.is_file():
        recorded = read_json_file(run_file, "the options of the earlier run", "delete it to resume anyway")
        changed = _differences(recorded if isinstance(recorded, dict) else {}, run)
        if changed:
            raise CliError(f"--resume: options differ from the run in {str(out)!r}: {', '.join(changed)}")
    out.mkdir(parents=True, exist_ok=True)
    write_text(run_file, json.dumps(run, indent=2, sort_keys=True) + "\n")
    if resume and not previous:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    return previous[-1] if resume and previous else None


def trainable_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model, optimizer, state: dict) -> Path:
    """Write ``epoch-K`` atomically (built in a hidden folder, fsynced, swapped in) and drop older
    checkpoints."""
    import torch

    from ..checkpoint.atomic import replace_folder

    payload = {**state, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
               "trainable": trainable_state(model)}

    def fill(folder: Path) -> None:
        model.save_pretrained(str(folder))
        torch.save(payload, folder / STATE_FILE)

    final = replace_folder(out / CHECKPOINTS / f"epoch-{state['epoch']}", fill)
    for older in epoch_dirs(out)[:-1]:
        shutil.rmtree(older)
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore trainable tensors, optimizer and RNG from ``path``; returns the saved counters and history."""
    import torch

    payload = read_state(path / STATE_FILE)
    params = dict(model.named_parameters())
    missing = sorted(set(payload["trainable"]) - set(params))
    if missing:
        raise CliError(f"--resume: checkpoint {path} does not match the model (unknown "
                       f"tensors {missing[:3]})")
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(payload.pop("optimizer"))
    torch.set_rng_state(payload.pop("rng"))
    payload.pop("trainable")
    return payload


STATE_KEYS = ("trainable", "optimizer", "rng", "epoch", "step", "seconds", "history")


def read_state(file: Path) -> dict:
    """``trainer_state.pt`` through ``torch.load(weights_only=True)``: pickled code is refused, never run."""
    import pickle

    import torch

    from ..errors import AdapterLoadError, UnsafeAdapterFileError

    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeAdapterFileError(
            f"{file} holds pickled objects other than tensors and plain values, refused by "
            f"torch.load(weights_only=True): {err}. Delete this checkpoint and train again.") from err
    except Exception as err:  # truncated or not a torch file
        raise AdapterLoadError(f"{file} could not be read with torch.load(weights_only=True) ({err}); the "
                               "checkpoint is damaged: delete its folder to resume from scratch.") from err
    missing = [k for k in STATE_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise AdapterLoadError(f"{file} is not a fastpeft train checkpoint (no {missing}); delete it.")
    return payload
