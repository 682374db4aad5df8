"""LoRA training step (forward + loss + backward) on a small Llama, fastpeft vs HF PEFT: time and peak memory.

Run: `.venv/bin/python benchmarks/lora_train.py [--quick] [--rounds N] [--threads 1]`
(or `python -m benchmarks.lora_train`). LoRA r=16, alpha 32, on all linear layers ('all-linear'), with
lora_dropout 0 and 0.05. Before timing, outputs and LoRA gradients are checked equal (dropout off). Times are
medians of interleaved rounds in one process; peak memory is the extra resident memory of one step, each
library in its own spawned process (see common.py). Prints fastpeft / HF PEFT ratios (below 1: fastpeft
better).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    base_parser,
    check_close,
    header,
    interleaved,
    peak_memory,
    ratio_line,
    rounds,
)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402

LIBS = {"fastpeft": fastpeft, "peft": peft}
# (hidden, intermediate, layers, heads, vocab, batch, tokens)
SIZES = {"full": (512, 1024, 4, 8, 1000, 4, 256), "quick": (256, 512, 2, 4, 1000, 2, 128)}
TARGETS = {0.0: (1.0, None), 0.05: (0.85, 0.85)}  # dropout -> (time target, memory target)


def build(lib_name: str, size: str, dropout: float):
    hidden, inter, layers, heads, vocab, _, _ = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    lib = LIBS[lib_name]
    config = lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                            task_type="CAUSAL_LM")
    model = lib.get_peft_model(base, config)
    torch.manual_seed(1)  # a trained-looking adapter (B != 0), the same in both libraries
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.02)
    return model.train()


def batch(size: str) -> torch.Tensor:
    _, _, _, _, vocab, rows, tokens = SIZES[size]
    return torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(2))


def step(state) -> torch.Tensor:
    model, ids = state
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def mem_setup(lib_name: str, size: str, dropout: float):
    return build(lib_name, size, dropout), batch(size)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}


def check(models: dict, ids: torch.Tensor) -> None:
    """Loss and every LoRA gradient agree with dropout switched off (eval mode keeps autograd on)."""
    for m in models.values():
        m.eval()
    losses = {name: step((m, ids)) for name, m in models.items()}
    check_close(losses["fastpeft"], losses["peft"], "loss (dropout off)")
    grads = {name: lora_grads(m) for name, m in models.items()}
    if sorted(grads["fastpeft"]) != sorted(grads["peft"]):
        raise AssertionError("fastpeft and HF PEFT train different parameters")
    check_close(grads["fastpeft"], grads["peft"], "LoRA gradients (dropout off)", atol=1e-5, rtol=1e-4)
    for m in models.values():
        m.train()


def time_step(args, dropout: float) -> None:
    size = "quick" if args.quick else "full"
    ids = batch(size)
    models = {name: build(name, size, dropout) for name in LIBS}
    check(models, ids)
    t = interleaved({name: (lambda m=m: step((m, ids))) for name, m in models.items()}, rounds(args))
    print(ratio_line(f"train step, dropout {dropout}", t["fastpeft"], t["peft"], "ms", TARGETS[dropout][0]))


def memory(args) -> None:
    """Peak memory of one step, every (library, dropout) in its own process (all started at once)."""
    size = "quick" if args.quick else "full"
    jobs = {(name, dropout): (mem_setup, (name, size, dropout), step) for name in LIBS for dropout in TARGETS}
    mem = peak_memory(jobs, repeats=1 if args.quick else 3, threads=args.threads)
    for dropout, (_, target) in TARGETS.items():
        print(ratio_line(f"train step peak memory, dropout {dropout}", mem["fastpeft", dropout],
                         mem["peft", dropout], "MiB", target))


# The most a faster dropout mask could save, at a real shape: Llama hidden 1024, intermediate 2816, 1 layer,
# 1 x 512 tokens. fastpeft with lora_dropout 0.05 (its default masks: nn.Dropout's, bit for bit) against the
# same model with no dropout at all, the floor any other mask (same Bernoulli law, another random stream)
# stays above; a mask option is worth offering only if that floor is well under 0.85x the default step.
BOUND_SIZE = (1024, 2816, 1, 16, 256, 1, 512)


def dropout_bound(args) -> None:
    SIZES["bound"] = BOUND_SIZE
    ids = batch("bound")
    models = {"hf 0.05": build("peft", "bound", 0.05), "fp 0.05": build("fastpeft", "bound", 0.05),
              "fp 0": build("fastpeft", "bound", 0.0)}
    t = interleaved({name: (lambda m=m: step((m, ids))) for name, m in models.items()}, rounds(args))
    hidden, inter, *_ = BOUND_SIZE
    print(f"dropout cost at Llama hidden {hidden}, intermediate {inter}, 1 layer, 512 tokens: HF PEFT 0.05 "
          f"{t['hf 0.05']:.1f} ms, fastpeft 0.05 {t['fp 0.05']:.1f} ms, "
          f"fastpeft no dropout {t['fp 0']:.1f} ms; "
          f"no-mask floor / default = {t['fp 0'] / t['fp 0.05']:.2f} (a faster mask: between this and 1)")


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--dropout-bound", action=argparse.BooleanOptionalAction, default=None,
                        help="time the no-dropout floor at a real shape (default: on in full mode)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    hidden, inter, layers, _, vocab, rows, tokens = SIZES["quick" if args.quick else "full"]
    print(f"Llama hidden {hidden}, intermediate {inter}, {layers} layers, vocab {vocab}; batch {rows} x "
          f"{tokens} tokens; LoRA r=16 alpha 32 all-linear")
    memory(args)  # first: the children fork from this process and inherit its heap (see common.peak_memory)
    for dropout in TARGETS:
        time_step(args, dropout)
    if args.dropout_bound or (args.dropout_bound is None and not args.quick):
        dropout_bound(args)


if __name__ == "__main__":
    main()
