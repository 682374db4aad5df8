"""The pieces of ``fastpeft train``: tokenizer and model loading, batches, the epoch loop and evaluation.

Shuffling uses a generator seeded with ``seed + epoch`` and the RNG state is checkpointed, so a resumed run
sees exactly the batches and dropout masks of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import CliError, auto_class_for


@dataclass
class Examples:
    """Texts plus class indices (None for causal LM)."""

    texts: list[str]
    targets: list[int] | None = None


@dataclass
class History:
    """Loss per step (with its epoch) and mean loss per epoch."""

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)


def load_tokenizer(model_path: str):
    """The MODEL's tokenizer, with a padding token (eos or unk) when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise CliError(f"MODEL {model_path!r}: no usable tokenizer ({exc})") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CliError(f"MODEL {model_path!r}: the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def load_base(model_path: str, task_type: str, labels: list[str] | None, seed: int, pad_token_id: int):
    """The base model for the task (a fresh classification head sized for ``labels``), seeded."""
    import torch

    torch.manual_seed(seed)
    kwargs = {}
    if labels:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {name: i for i, name in enumerate(labels)}, "ignore_mismatched_sizes": True}
    try:
        base = auto_class_for(task_type).from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise CliError(f"MODEL {model_path!r} could not be loaded: {exc}") from None
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = pad_token_id
    return base


def make_batch(tokenizer, data: Examples, idx: list[int], max_length: int) -> dict:
    """Tokenized batch with labels: class indices, or the input ids with padding masked to -100."""
    import torch

    enc = dict(tokenizer([data.texts[i] for i in idx], padding=True, truncation=True,
                         max_length=max_length, return_tensors="pt"))
    if data.targets is not None:
        enc["labels"] = torch.tensor([data.targets[i] for i in idx])
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
    return enc


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def train_epoch(model, optimizer, tokenizer, data: Examples, settings, epoch: int,
                history: History, bar) -> None:
    """One pass over ``data`` in the epoch's order; appends to ``history`` and advances ``bar``."""
    order = epoch_order(len(data.texts), settings.seed, epoch)
    model.train()
    losses = []
    for start in range(0, len(order), settings.batch_size):
        batch = make_batch(tokenizer, data, order[start : start + settings.batch_size], settings.max_length)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        history.steps.append({"step": len(history.steps) + 1, "epoch": epoch + 1, "loss": losses[-1]})
        bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{losses[-1]:.4f}")
        bar.update(1)
    history.epochs.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses)})


def evaluate(model, tokenizer, data: Examples, settings) -> dict:
    """Mean loss (weighted by batch size) and, for classification, accuracy on ``data``."""
    import torch

    model.eval()
    total, correct, n = 0.0, 0, len(data.texts)
    with torch.no_grad():
        for start in range(0, n, settings.batch_size):
            idx = list(range(start, min(start + settings.batch_size, n)))
            batch = make_batch(tokenizer, data, idx, settings.max_length)
            output = model(**batch)
            total += output.loss.item() * len(idx)
            if data.targets is not None:
                correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
    result = {"loss": total / n, "examples": n}
    if data.targets is not None:
        result["accuracy"] = correct / n
    return result
