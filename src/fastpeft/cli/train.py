"""``fastpeft train MODEL DATA``: fine-tune an adapter on a JSONL/CSV file with a plain AdamW loop.

Writes the adapter, the tokenizer, ``metrics.json`` and ``loss_curve.png`` into ``--output-dir``;
``--resume`` continues from the last per-epoch checkpoint there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import checkpoints
from .common import TASKS, CliError, save_tokenizer, setup_runtime, write_text
from .dataset import label_names, load_examples
from .options import build_method_config, flag_values, read_config_file, resolve_method
from .plots import PLOT_FILE, plot_training
from .trainer import Examples, History, evaluate, load_base, load_tokenizer, train_epoch

METRICS_FILE = "metrics.json"
LABELS_FILE = "labels.json"


def _examples(texts: list[str], labels: list | None, names: list[str] | None, path: str,
              what: str) -> Examples:
    """Texts plus class indices looked up in ``names`` (the training labels)."""
    if labels is None:
        return Examples(texts)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(label).strip() for label in labels} - set(index))
    if unknown:
        raise CliError(f"{what} file {path!r}: labels {unknown} do not occur in the training data")
    return Examples(texts, [index[str(label).strip()] for label in labels])


def _run_record(args, config) -> dict:
    """What identifies the run; ``--resume`` refuses a different one."""
    method_config = {k: v for k, v in config.to_json_dict().items() if k not in ("peft_version",)}
    return {"model": args.model, "data": str(Path(args.data).resolve()), "method": config.peft_type,
            "task": args.task, "method_config": method_config, "seed": args.seed, "lr": args.lr,
            "batch_size": args.batch_size, "max_length": args.max_length, "epochs": args.epochs,
            "eval_data": args.eval_data}


def _build(args, config, names):
    """Tokenizer, PEFT model and its AdamW optimizer, built identically for fresh and resumed runs."""
    import torch

    from fastpeft import get_peft_model

    tokenizer = load_tokenizer(args.model)
    base = load_base(args.model, config.task_type, names, args.seed, tokenizer.pad_token_id)
    try:
        model = get_peft_model(base, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise CliError(f"could not add the {args.method} adapter to {args.model!r}: {exc}") from None
    params = [p for p in model.parameters() if p.requires_grad]
    return tokenizer, model, torch.optim.AdamW(params, lr=args.lr)


def _restore(path, model, optimizer, history: History) -> tuple[int, float]:
    """Load a checkpoint; returns (epochs done, seconds already spent)."""
    state = checkpoints.load_checkpoint(path, model, optimizer)
    history.steps[:], history.epochs[:] = state["history"]["steps"], state["history"]["epochs"]
    print(f"resuming from {path} (epoch {state['epoch']}, step {state['step']})")
    return state["epoch"], state["seconds"]


def _loop(args, model, optimizer, tokenizer, data: Examples, resume_from) -> tuple[History, float, int]:
    """Train the remaining epochs, checkpointing each; returns (history, seconds, first epoch run)."""
    from tqdm.auto import tqdm

    history = History()
    done, spent = _restore(resume_from, model, optimizer, history) if resume_from else (0, 0.0)
    out, start = Path(args.output_dir), time.perf_counter()
    per_epoch = math.ceil(len(data.texts) / args.batch_size)
    bar = tqdm(total=per_epoch * args.epochs, initial=per_epoch * done, desc="training", unit="step",
               dynamic_ncols=True)
    for epoch in range(done, args.epochs):
        train_epoch(model, optimizer, tokenizer, data, args, epoch, history, bar)
        seconds = spent + time.perf_counter() - start
        state = {"epoch": epoch + 1, "step": len(history.steps), "seconds": seconds,
                 "history": {"steps": history.steps, "epochs": history.epochs}}
        checkpoints.save_checkpoint(out, model, optimizer, state)
    bar.close()
    return history, spent + time.perf_counter() - start, done


def _write_outputs(args, model, tokenizer, history: History, extra: dict) -> dict:
    """Adapter + tokenizer + metrics.json + loss_curve.png in the output folder; returns the metrics."""
    out = Path(args.output_dir)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    trainable, total = model.get_nb_trainable_parameters()
    losses = [s["loss"] for s in history.steps]
    per_epoch = [sum(1 for s in history.steps if s["epoch"] == e["epoch"]) for e in history.epochs]
    metrics = {"method": args.method, "task": args.task, "model": args.model, "data": args.data,
               "epochs": args.epochs, "steps": history.steps, "epoch_loss": history.epochs,
               "trainable_params": trainable, "total_params": total, **extra}
    write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    title = f"fastpeft train: {args.method} on {Path(args.model).name} ({args.task})"
    plot_training(out / PLOT_FILE, title, losses, [e["loss"] for e in history.epochs], per_epoch)
    return metrics


def run_train(args) -> int:
    """The ``train`` subcommand; returns the exit code."""
    spec = resolve_method(args.method)
    args.method = spec.peft_type.value.lower()
    task_type = TASKS[args.task][0]
    texts, labels = load_examples(args.data, task_type)
    names = label_names(labels) if labels is not None else None
    data = _examples(texts, labels, names, args.data, "DATA")
    eval_data = None
    if args.eval_data:
        eval_rows = load_examples(args.eval_data, task_type, "--eval-data")
        eval_data = _examples(*eval_rows, names, args.eval_data, "--eval-data")
    config = build_method_config(spec, read_config_file(args.config),
                                 flag_values(args, spec.config_cls), task_type)
    setup_runtime()
    resume_from = checkpoints.prepare_output(Path(args.output_dir), _run_record(args, config), args.resume)
    tokenizer, model, optimizer = _build(args, config, names)
    model.print_trainable_parameters()
    history, seconds, first = _loop(args, model, optimizer, tokenizer, data, resume_from)
    final_eval = evaluate(model, tokenizer, eval_data, args) if eval_data else None
    if names:
        write_text(Path(args.output_dir, LABELS_FILE), json.dumps({"labels": names}) + "\n")
    timing = {"seconds": seconds, "seconds_per_step": seconds / max(len(history.steps), 1)}
    metrics = _write_outputs(args, model, tokenizer, history,
                             {"eval": final_eval, "timing": timing, "resumed_at_epoch": first or None})
    last = metrics["epoch_loss"][-1]["loss"] if metrics["epoch_loss"] else float("nan")
    print(f"final epoch loss {last:.4f}" + (f", eval {final_eval}" if final_eval else ""))
    print(f"adapter, metrics.json and {PLOT_FILE} written to {args.output_dir}")
    return 0
