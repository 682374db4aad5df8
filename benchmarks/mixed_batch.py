"""Mixed-adapter batch forward: fastpeft (gathered path and per-adapter loop) vs HF PEFT, in one process.

Run: `.venv/bin/python benchmarks/mixed_batch.py [--threads N] [--repeats N]`. Prints a table of median
times and the ratio HF PEFT / fastpeft (above 1: fastpeft is faster). Small enough for a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.methods.lora import gathered  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = (4, 8, 16)
# (label, distinct adapters, batch, tokens per row)
SCENARIOS = [
    ("64 adapters x decode", 64, 64, 1),
    ("16 adapters x decode", 16, 32, 1),
    ("8 adapters x decode", 8, 32, 1),
    ("4 adapters x decode", 4, 32, 1),
    ("2 adapters x decode", 2, 32, 1),
    ("4 adapters x 128 tokens", 4, 8, 128),
    ("3 adapters x 128 tokens", 3, 6, 128),
    ("2 adapters x 256 tokens", 2, 4, 256),
]


def base_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def lora_config(lib, i: int):
    r = RANKS[i % len(RANKS)]
    return lib.LoraConfig(r=r, lora_alpha=2 * r + i, use_rslora=i % 4 == 3, target_modules=TARGETS,
                          init_lora_weights=False)


def with_adapters(lib, n: int):
    model = lib.get_peft_model(base_model(), lora_config(lib, 0), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", lora_config(lib, i))
    torch.manual_seed(1)  # same random adapter weights in both libraries (same parameter order)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape) * 0.05)
    return model.eval()


def timed(variants: dict, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each `variants[label]()`; runs are interleaved so machine noise hits all."""
    times: dict[str, list[float]] = {label: [] for label in variants}
    for i in range(repeats + 2):  # the first two rounds warm up
        for label, fn in variants.items():
            start = time.perf_counter()
            fn()
            if i >= 2:
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


def with_rule(min_adapters: int, fn):
    """`fn` run with gathered.MIN_ADAPTERS set to `min_adapters` (1: always gathered, huge: always loop)."""
    def run():
        saved, gathered.MIN_ADAPTERS = gathered.MIN_ADAPTERS, min_adapters
        try:
            return fn()
        finally:
            gathered.MIN_ADAPTERS = saved
    return run


def run_scenario(models, n_adapters, batch, tokens, repeats) -> dict[str, float]:
    ours, theirs = models
    names = [f"a{i % n_adapters}" for i in range(batch)]
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(2))

    def call(model):
        with torch.inference_mode():
            return model(input_ids=ids, adapter_names=names).logits

    expected = call(theirs)
    for path in (with_rule(1, lambda: call(ours)), with_rule(10**9, lambda: call(ours))):
        torch.testing.assert_close(path(), expected, atol=1e-4, rtol=1e-4)
    return timed({"hf": lambda: call(theirs), "loop": with_rule(10**9, lambda: call(ours)),
                  "gathered": with_rule(1, lambda: call(ours)), "default": lambda: call(ours)}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)  # 2 threads on the 2-vCPU dev VM: noise dominates
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = (with_adapters(fastpeft, 64), with_adapters(peft, 64))
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads, "
          f"rule: gathered when >= {gathered.MIN_ADAPTERS} distinct adapters")
    print(f"| {'scenario':26} | HF PEFT ms | fp loop ms | fp gathered ms | fp default ms | HF / fp default |")
    print(f"|{'-' * 28}|-----------:|-----------:|---------------:|--------------:|----------------:|")
    for label, n, batch, tokens in SCENARIOS:
        t = run_scenario(models, n, batch, tokens, args.repeats)
        print(f"| {label:26} | {t['hf']:10.2f} | {t['loop']:10.2f} | {t['gathered']:14.2f} | "
              f"{t['default']:13.2f} | {t['hf'] / t['default']:14.2f}x |")


if __name__ == "__main__":
    main()
