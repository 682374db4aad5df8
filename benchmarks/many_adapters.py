"""Many LoRA adapters in one batch at a Llama-1B-like width: decode with a KV cache and prefill, vs the bare
base model and HF PEFT, as the number of distinct adapters grows (8 -> 64 -> 256 -> 1024).

Run: `.venv/bin/python benchmarks/many_adapters.py [--quick] [--clock cpu] [--counts 8,64,256,1024]
[--layers 4] [--hidden 2048] [--hf-max 256] [--png benchmarks/many_adapters.png]`.

Model: Llama with TinyLlama-1.1B's widths (hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocab 32000)
and `--layers` decoder layers, bf16 weights (the CPU has AMX-bf16: bf16 matmuls ~5x fp32 here). N LoRA
adapters on q/k/v/o_proj (the S-LoRA / Punica serving setup), ranks 8 / 16 / 32 in turn, built in fp32 in
both libraries with the same random factors, then the whole model moved to bf16.

Decode: one new token for each of `max(N, 64)` rows (row i uses adapter i mod N: N >= 64 gives every row its
own adapter), continuing a `--past`-token KV cache of random keys / values (the same cache in every variant,
cut back to its length after each call, untimed). Prefill: 2048 tokens per call, N rows of 2048 / N tokens
(at least 2). Variants, alternated each round (order reversed every other round), medians: the bare base
model (same weights, no PEFT: the floor), fastpeft (default: stacked factors kept across calls), fastpeft
with the stacks switched off (the factors stacked on every call, as before), HF PEFT (up to `--hf-max`
adapters: its per-adapter loop passes a few seconds per call beyond that). Outputs of every variant are
checked against each other (bf16 tolerances) before timing. Memory: bytes of LoRA parameters per adapter
(fastpeft's stacks add none: they are the parameters' storage, methods/lora/stacked.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.methods.lora import stacked  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = (8, 16, 32)
PREFILL_TOKENS = 2048


def base_model(args) -> LlamaForCausalLM:
    h = args.hidden
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=int(h * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=h // 64,
                      num_key_value_heads=max(h // 512, 1), max_position_embeddings=4096,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def with_adapters(lib, args, n: int):
    """The base model with n adapters (same factors in both libraries), in bf16."""
    def config(i):
        r = RANKS[i % len(RANKS)]
        return lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)

    model = lib.get_peft_model(base_model(args), config(0), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config(i))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():  # same order in both libraries
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.to(torch.bfloat16).eval()


def kv_cache(args, rows: int) -> DynamicCache:
    heads, head_dim = max(args.hidden // 512, 1), 64
    gen = torch.Generator().manual_seed(2)
    cache = DynamicCache()
    for layer in range(args.layers):
        k, v = (torch.randn(rows, heads, args.past, head_dim, generator=gen).to(torch.bfloat16) for _ in "kv")
        cache.update(k, v, layer)
    return cache


def base_weight_mb(model) -> float:
    """MiB of base weights a forward reads in full (all but the embedding table, of which it reads rows)."""
    sizes = [p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n]
    return sum(sizes) / 2**20


def bytes_floor(r: dict) -> float:
    """(base weights + the batch's LoRA factors) / base weights: the ratio to the base model of a step that
    reads the factors as fast as the base reads its weights (not a physical floor: the base's matmuls of
    64+ rows are compute-bound on this CPU, see benchmarks/README.md)."""
    return 1 + r["lora_mb_per_adapter"] * r["n"] / r["base_mb"]


def interleaved(variants: dict, rounds: int, clock, reset) -> dict[str, float]:
    labels = list(variants)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(1 + rounds):  # one warm-up round
        for label in labels if i % 2 == 0 else labels[::-1]:
            reset()
            start = clock()
            variants[label]()
            if i:
                times[label].append((clock() - start) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


def unstacked(fn):
    def run():
        saved, stacked.usable = stacked.usable, lambda layer: False
        try:
            return fn()
        finally:
            stacked.usable = saved
    return run


def measure(args, n: int, clock) -> dict:
    ours = with_adapters(fastpeft, args, n)
    gc.collect()
    lora_bytes = sum(p.numel() * p.element_size() for name, p in ours.named_parameters() if ".lora_" in name)
    theirs = with_adapters(peft, args, n) if n <= args.hf_max else None
    bare = base_model(args).to(torch.bfloat16)
    models = {"base": (bare, False), "fastpeft": (ours, True), "unstacked": (ours, True)}
    if theirs is not None:
        models["hf"] = (theirs, True)
    out = {"n": n, "lora_mb_per_adapter": lora_bytes / n / 2**20, "base_mb": base_weight_mb(bare)}
    for mode in ("decode", "prefill"):
        rows = max(n, 64) if mode == "decode" else n
        tokens = 1 if mode == "decode" else max(PREFILL_TOKENS // n, 2)
        names = [f"a{i % n}" for i in range(rows)]
        ids = torch.randint(0, args.vocab, (rows, tokens), generator=torch.Generator().manual_seed(3))
        cache = kv_cache(args, rows) if mode == "decode" else None

        def call(model, mixed, cache=cache, ids=ids, names=names):
            kwargs = {"adapter_names": names} if mixed else {}
            with torch.inference_mode():
                return model(input_ids=ids, past_key_values=cache, **kwargs).logits[:, -1].float()

        def reset(cache=cache):
            extra = 0 if cache is None else cache.get_seq_length() - args.past
            if extra:
                cache.crop(-extra)  # transformers 5: a negative count removes that many tokens

        variants = {label: (lambda m=m, mixed=mixed: call(m, mixed)) for label, (m, mixed) in models.items()}
        variants["unstacked"] = unstacked(variants["unstacked"])
        check(variants, reset, mode, n)
        t = interleaved(variants, args.repeats, clock, reset)
        out[mode] = {"rows": rows, "tokens": tokens, "ms": t}
        print(f"N={n:5d} {mode:7s} {rows} rows x {tokens} tokens: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items())
              + f"; fastpeft / base {t['fastpeft'] / t['base']:.3f}", flush=True)
    del ours, theirs, bare, models
    gc.collect()
    return out


def decompose(args, n: int, clock) -> str:
    """Where fastpeft's decode time over the base goes, as ratios to the bare model: "no bmm" runs the stacked
    path with each group's LoRA output memoised (the two `bmm`s skipped, everything else as usual), "wrapper"
    calls every LoRA layer as in a mixed batch but runs only its base layer."""
    from fastpeft.methods.lora import layer as lora_layer
    ours, bare = with_adapters(fastpeft, args, n), base_model(args).to(torch.bfloat16)
    rows = max(n, 64)
    names = [f"a{i % n}" for i in range(rows)]
    ids = torch.randint(0, args.vocab, (rows, 1), generator=torch.Generator().manual_seed(3))
    cache = kv_cache(args, rows)

    def call(model, mixed):
        with torch.inference_mode():
            return model(input_ids=ids, past_key_values=cache, **({"adapter_names": names} if mixed else {}))

    def reset():
        extra = cache.get_seq_length() - args.past
        if extra:
            cache.crop(-extra)

    real, memo = stacked.stacked_output, {}

    def memoised(x, group):
        key = (id(group), x.shape)
        if key not in memo:
            memo[key] = real(x, group)
        return memo[key]

    def patched(owner, attr, value):
        def run():
            saved = getattr(owner, attr)
            setattr(owner, attr, value)
            try:
                return call(ours, True)
            finally:
                setattr(owner, attr, saved)
        return run

    variants = {"base": lambda: call(bare, False), "fastpeft": lambda: call(ours, True),
                "no bmm": patched(stacked, "stacked_output", memoised),
                "wrapper": patched(lora_layer.Linear, "mixed_forward",
                                   lambda self, x, *a, adapter_names, **k: self.base_forward(x))}
    t = interleaved(variants, max(args.repeats, 11), clock, reset)
    lora = [p for name, p in ours.named_parameters() if ".lora_" in name]
    lora_mb = sum(p.numel() * p.element_size() for p in lora) / 1e6
    bmm_ms = t["fastpeft"] - t["no bmm"]
    return (f"| {n} | {t['base']:.1f} | " + " | ".join(f"{t[k] / t['base']:.3f}" for k in list(t)[1:])
            + f" | {bmm_ms / t['base']:.3f} | {lora_mb:.0f} MB | {lora_mb / bmm_ms:.1f} GB/s |")


def check(variants: dict, reset, mode: str, n: int) -> None:
    """Every adapter variant gives the same logits (bf16 rounding apart), and they differ from the base."""
    reset()
    ref = variants["fastpeft"]()
    for label in variants:
        if label in ("fastpeft", "base"):
            continue
        reset()
        got = variants[label]()
        err = (got - ref).abs().max().item()
        assert err < 0.05 * ref.abs().max().item(), f"{label} vs fastpeft, {mode}, N={n}: max diff {err}"
    reset()
    assert not torch.allclose(variants["base"](), ref, atol=1e-3), "the adapters change nothing"


def table(results: list[dict], args) -> str:
    lines = ["| N adapters | mode | rows x tokens | base ms | fastpeft ms | no-stack ms | HF PEFT ms "
             "| fastpeft / base | bytes floor | fastpeft / HF | LoRA MiB / adapter |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for mode in ("decode", "prefill"):
            m = r[mode]
            t = m["ms"]
            hf = f"{t['hf']:.1f}" if "hf" in t else "-"
            ratio_hf = f"{t['fastpeft'] / t['hf']:.2f}" if "hf" in t else "-"
            lines.append(f"| {r['n']} | {mode} | {m['rows']} x {m['tokens']} | {t['base']:.1f} | "
                         f"{t['fastpeft']:.1f} | {t['unstacked']:.1f} | {hf} | "
                         f"**{t['fastpeft'] / t['base']:.3f}** | {bytes_floor(r):.3f} | {ratio_hf} | "
                         f"{r['lora_mb_per_adapter']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, shapes: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ns = [r["n"] for r in results]
    for ax, mode in zip(axes[:2], ("decode", "prefill")):
        for label, style in (("base", "k--"), ("fastpeft", "o-"), ("unstacked", "s:"), ("hf", "^-")):
            pts = [(r["n"], r[mode]["ms"][label] / (r[mode]["rows"] * r[mode]["tokens"]) * 1e3)
                   for r in results if label in r[mode]["ms"]]
            if pts:
                ax.plot(*zip(*pts), style, label={"unstacked": "fastpeft, stacks off", "hf": "HF PEFT",
                                                   "base": "bare base model"}.get(label, label))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("µs per token")
        ax.set_title(f"{mode}")
        ax.legend(fontsize=8)
    axes[2].plot(ns, [r["lora_mb_per_adapter"] for r in results], "o-", label="LoRA MiB per adapter (left)")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("distinct adapters")
    axes[2].set_ylabel("MiB per adapter (stacks add none)")
    axes[2].set_ylim(bottom=0)
    twin = axes[2].twinx()
    for mode, style in (("decode", "s:"), ("prefill", "^:")):
        twin.plot(ns, [(r[mode]["ms"]["fastpeft"] - r[mode]["ms"]["base"]) / r["n"] for r in results], style,
                  color="C3" if mode == "decode" else "C4", label=f"{mode}: (fastpeft - base) ms per adapter")
    twin.set_yscale("log")
    twin.set_ylabel("ms per adapter per call")
    axes[2].set_title("per adapter: memory and time")
    lines = axes[2].get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axes[2].legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
    fig.suptitle(shapes, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 512, 2 layers, N 8 and 64, 3 rounds")
    parser.add_argument("--counts", default="8,64,256,1024")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--past", type=int, default=256, help="KV-cache length of the decode rows")
    parser.add_argument("--hf-max", type=int, default=256, help="largest N HF PEFT runs at")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--png", default=None, help="default: benchmarks/many_adapters.png (--quick: none)")
    parser.add_argument("--json", default=None, help="default: benchmarks/many_adapters.json (--quick: none)")
    parser.add_argument("--from-json", default="", help="only print the table and plot of a saved run")
    parser.add_argument("--decompose", action="store_true", help="decode only: fastpeft's time over the base "
                        "split into the stacked bmms, the rest of the adapter path and the layer wrapper")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    if args.png is None:
        args.png = "" if args.quick else os.path.join(here, "many_adapters.png")
    if args.json is None:
        args.json = "" if args.quick else os.path.join(here, "many_adapters.json")
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        if any("base_mb" not in r for r in saved["results"]):  # runs saved before the floor was recorded
            base_mb = base_weight_mb(base_model(args).to(torch.bfloat16))
            for r in saved["results"]:
                r.setdefault("base_mb", base_mb)
        print(table(saved["results"], args))
        if args.png:
            plot(saved["results"], args.png, saved["shapes"])
        return
    if args.quick:
        args.hidden, args.layers, args.counts, args.repeats, args.vocab = 512, 2, "8,64", 3, 8000
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    shapes = (f"Llama hidden {args.hidden}, intermediate {int(args.hidden * 2.75)}, {args.layers} layers, "
              f"{args.hidden // 64} heads / {max(args.hidden // 512, 1)} KV heads, vocab {args.vocab}, bf16; "
              f"LoRA r 8/16/32 on q,k,v,o; decode: max(N, 64) rows, {args.past}-token KV cache; prefill: "
              f"{PREFILL_TOKENS} tokens in N rows")
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} thread(s), {args.clock} "
          f"clock, {args.repeats} rounds; {shapes}", flush=True)
    if args.decompose:
        print("| N | base ms | fastpeft / base | no bmm / base | wrapper / base | bmm share "
              "| factors per step | bmm read speed |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.counts.split(","):
            print(decompose(args, int(n), clock), flush=True)
        return
    results = [measure(args, int(n), clock) for n in args.counts.split(",")]
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shapes": shapes, "clock": args.clock, "results": results}, fh, indent=1)
    if args.png:
        plot(results, args.png, shapes)


if __name__ == "__main__":
    main()
