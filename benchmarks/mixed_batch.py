"""Mixed-adapter batch forward: fastpeft (each of its paths, and its default rule) vs HF PEFT, in one process.

Run: `.venv/bin/python benchmarks/mixed_batch.py [--threads 1] [--repeats 9] [--only TEXT] [--clock cpu]
[--hidden 256] [--kv-cache 0]`.
Prints a table of median times (interleaved rounds, order reversed every other round) and the ratio fastpeft
default / HF PEFT (below 1: fastpeft is faster). Outputs of every fastpeft path are checked against HF PEFT
before timing. Small enough for a 2-core CPU; `--only "x 512"` runs the scenarios whose label contains the
text. `--clock cpu` times the CPU the calling thread used (`time.thread_time`) instead of wall time: with 1
torch thread every op runs in that thread, and on a machine shared with other jobs it leaves out the time
spent waiting for a core, the bulk of the noise there. `--hidden H`: Llama hidden size H (intermediate 2H,
heads H/64). `--kv-cache N`: decode rows continue an N-token prefix held in a KV cache (prefilled once per
library with the same adapters; each timed call gets a fresh copy of it, copied outside the timing); 0: decode
rows have no past.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from common import check_close  # noqa: E402
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
    ("2 adapters x 512 tokens", 2, 4, 512),
    ("4 adapters x 512 tokens", 4, 8, 512),
    ("2 adapters x 1024 tokens", 2, 4, 1024),
]
# each fastpeft path forced through the rule constants of methods/lora/gathered.py (None: left as it is)
PATHS = {"loop": (10**9, float("inf")), "gathered": (1, float("inf")), "merged": (10**9, 0.0),
         "default": None}


HIDDEN = 256  # set from --hidden


def base_model() -> LlamaForCausalLM:
    heads = max(HIDDEN // 64, 1)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
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


def on_path(path: str, fn):
    """`fn` run with gathered.MIN_ADAPTERS / MERGE_FROM set to force `path` ("default": the shipped rule)."""
    rule = PATHS[path]

    def run(*args):
        if rule is None:
            return fn(*args)
        saved = gathered.MIN_ADAPTERS, gathered.MERGE_FROM
        gathered.MIN_ADAPTERS, gathered.MERGE_FROM = rule
        try:
            return fn(*args)
        finally:
            gathered.MIN_ADAPTERS, gathered.MERGE_FROM = saved
    return run


def interleaved(variants: dict, rounds: int, clock, warmup: int = 2, setup=None) -> dict[str, float]:
    """Median ms of each `variants[label](*setup(label))` by `clock` (setup untimed); every round runs each
    once, order reversed every other round (as common.interleaved, with a choice of clock)."""
    labels = list(variants)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(warmup + rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            args = setup(label) if setup is not None else ()
            start = clock()
            variants[label](*args)
            if i >= warmup:
                times[label].append((clock() - start) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


def prefilled(models, names, batch: int, kv: int) -> dict[str, object]:
    """label -> KV cache of a `kv`-token prefix, made by the model (and adapters) that label times."""
    if kv == 0:
        return {}
    ours, theirs, bare = models
    prefix = torch.randint(0, 1000, (batch, kv), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        caches = {"hf": theirs(input_ids=prefix, adapter_names=names, use_cache=True).past_key_values,
                  "base": bare(input_ids=prefix, use_cache=True).past_key_values}
        ours_cache = ours(input_ids=prefix, adapter_names=names, use_cache=True).past_key_values
    return {**caches, **{path: ours_cache for path in PATHS}}


def run_scenario(models, n_adapters, batch, tokens, repeats, clock, kv: int = 0) -> dict[str, float]:
    ours, theirs, bare = models
    names = [f"a{i % n_adapters}" for i in range(batch)]
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(2))
    caches = prefilled(models, names, batch, kv if tokens == 1 else 0)

    def setup(label):  # a fresh copy of the prefix cache per call (a forward appends to it)
        return (copy.deepcopy(caches[label]),) if caches else (None,)

    def call(model, past, **kwargs):
        with torch.inference_mode():
            return model(input_ids=ids, past_key_values=past, **kwargs).logits

    expected = call(theirs, *setup("hf"), adapter_names=names)
    variants = {"hf": lambda past: call(theirs, past, adapter_names=names)}
    for path in PATHS:
        variants[path] = on_path(path, lambda past: call(ours, past, adapter_names=names))
        check_close(variants[path](*setup(path)), expected,
                    f"{n_adapters} adapters, {batch} x {tokens}, {path}", atol=1e-4, rtol=1e-4)
    # the bare base model: the floor for any adapter implementation
    variants["base"] = lambda past: call(bare, past)
    return interleaved(variants, repeats, clock, setup=setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)  # 2 threads on the 2-vCPU dev VM: noise dominates
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="", help="run the scenarios whose label contains this text")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.thread_time (this thread's CPU time)")
    parser.add_argument("--hidden", type=int, default=256,
                        help="Llama hidden size (intermediate 2x, heads /64)")
    parser.add_argument("--kv-cache", type=int, default=0,
                        help="decode rows continue a prefix of this many tokens")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    global HIDDEN
    HIDDEN = args.hidden
    models = (with_adapters(fastpeft, 64), with_adapters(peft, 64), base_model())
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads, {args.repeats} "
          f"rounds, {args.clock} clock; "
          f"rule: gathered from {gathered.MIN_ADAPTERS} distinct adapters, merged from "
          f"{gathered.MERGE_FROM:g} x in*out/(in+out) tokens per adapter")
    print(f"Llama: hidden {HIDDEN}, intermediate {2 * HIDDEN}, 2 layers, vocab 1000; 64 LoRA adapters (r "
          "4/8/16) on all 7 projections; decode rows: "
          f"{f'{args.kv_cache}-token KV cache' if args.kv_cache else 'no past'}")
    rows = []
    for label, n, batch, tokens in SCENARIOS:
        if args.only in label:
            rows.append((label, run_scenario(models, n, batch, tokens, args.repeats, clock, args.kv_cache)))
    print(f"| {'scenario':24} | HF PEFT ms | loop ms | gathered ms | merged ms | default ms | base ms "
          "| default / HF | base / HF |")
    print(
        f"|{'-' * 26}|-----------:|--------:|------------:|----------:|-----------:|--------:|-------------:"
        "|----------:|")
    for label, t in rows:
        print(f"| {label:24} | {t['hf']:10.2f} | {t['loop']:7.2f} | {t['gathered']:11.2f} | "
              f"{t['merged']:9.2f} | {t['default']:10.2f} | {t['base']:7.2f} | "
              f"{t['default'] / t['hf']:12.2f} | {t['base'] / t['hf']:9.2f} |")


if __name__ == "__main__":
    main()
