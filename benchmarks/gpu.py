"""fastpeft vs HF PEFT vs the bare model on one CUDA device: LoRA / DoRA / QLoRA training steps and
mixed-adapter decoding with a KV cache. Writes one JSON and one markdown table.

Run: `.venv/bin/python benchmarks/gpu.py [--out benchmarks/gpu_results] [--rounds 5]` on a machine with a CUDA
device (about 4-6 minutes on one H100, by estimate: this script has not yet run on a GPU). Without CUDA it
refuses; `--dry-run` runs every code path on the CPU at tiny shapes (hidden 64, 2 layers, 1 round) to check
the script itself, and its numbers mean nothing.

Model: Llama-3.2-1B-shaped layers (hidden 2048, intermediate 8192, 32 heads / 8 KV heads), 16 layers, vocab
32000, random bf16 weights. Rows, each with its shapes:
- train LoRA / DoRA: r=16 alpha 32 on q,k,v,o,gate,up,down, one step of forward + loss + backward + AdamW,
  4 x 1024 tokens; the floor is the bare model's forward + backward with respect to its input embeddings
- train QLoRA: the same on the model quantized to 4-bit NF4 by bitsandbytes (bf16 compute), loaded from a
  saved copy through transformers' BitsAndBytesConfig; skipped with the reason where bitsandbytes is missing
- mixed decode: `generate(adapter_names=...)` with 8 and 64 distinct adapters (ranks 8 / 16 / 32 in turn) over
  64 rows (row i uses adapter i mod N), 128 prompt tokens, 32 new tokens (min = max, greedy); the floor is
  the bare model's `generate` on the same rows
Times are medians of interleaved rounds (the libraries' order reversed every other round) with
`torch.cuda.synchronize()` around each call; peak memory is `torch.cuda.max_memory_allocated` during one call
beyond what was allocated before it. fastpeft's and HF PEFT's outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import peft  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import fastpeft  # noqa: E402

hf_logging.set_verbosity_error()
LIBS = {"fastpeft": fastpeft, "peft": peft}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (hidden, intermediate, layers, heads, kv heads, vocab, train (rows, tokens), decode rows, prompt, new,
#  adapter counts)
SIZES = {
    "gpu": (2048, 8192, 16, 32, 8, 32000, (4, 1024), 64, 128, 32, (8, 64)),
    "dry": (64, 128, 2, 4, 2, 100, (2, 16), 8, 8, 4, (4, 8)),
}
REL_TOL = 3e-2  # bf16 (8 mantissa bits) through 16 layers, two libraries rounding in different places


class Bench:
    def __init__(self, device: torch.device, size: str, rounds: int) -> None:
        self.device, self.size, self.rounds = device, size, rounds
        (self.hidden, self.inter, self.layers, self.heads, self.kv, self.vocab, self.train_shape,
         self.decode_rows, self.prompt, self.new, self.adapter_counts) = SIZES[size]
        self.rows: list[dict] = []
        self.model_shape = (f"Llama h{self.hidden}/i{self.inter} x{self.layers}L, "
                            f"{self.heads}/{self.kv} heads, vocab {self.vocab}, bf16")

    # ---------------------------------------------------------------------------------------------- models
    def config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.inter,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv, max_position_embeddings=4096,
                           tie_word_embeddings=False, attn_implementation="sdpa")

    def base(self) -> LlamaForCausalLM:
        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM(self.config()).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.generation_config.pad_token_id = 0
        return model.eval()

    def ids(self, rows: int, tokens: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(2)
        return torch.randint(0, self.vocab, (rows, tokens), generator=gen).to(self.device)

    # ---------------------------------------------------------------------------------------------- timing
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def interleaved(self, variants: dict) -> dict[str, float]:
        times = {k: [] for k in variants}
        labels = list(variants)
        for i in range(1 + self.rounds):  # one warm-up round
            for label in labels if i % 2 == 0 else labels[::-1]:
                elapsed = self.timed(variants[label])
                if i:
                    times[label].append(elapsed)
        return {k: statistics.median(v) for k, v in times.items()}

    def peak_mib(self, fn) -> float | None:
        if self.device.type != "cuda":
            return None
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def record(self, workload: str, shape: str, times: dict, peaks: dict | None = None,
               note: str = "") -> None:
        row = {"workload": workload, "shape": shape, "ms": times, "peak_mib": peaks or {}, "note": note}
        if "fastpeft" in times and "peft" in times:
            row["fastpeft_over_hf"] = times["fastpeft"] / times["peft"]
        if "base" in times and "peft" in times:
            row["base_over_hf"] = times["base"] / times["peft"]
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def wrap(lib_name: str, base, configs: list[dict]):
    """`base` (shared weights: a deep copy whose memo maps each base Parameter to itself) with one adapter
    per config, named a0, a1, ...; adapter weights random (B != 0), the same in both libraries."""
    lib = LIBS[lib_name]
    memo = {id(p): p for p in base.parameters()}
    model = lib.get_peft_model(copy.deepcopy(base, memo), lib.LoraConfig(**configs[0]), adapter_name="a0")
    for i, options in enumerate(configs[1:], 1):
        model.add_adapter(f"a{i}", lib.LoraConfig(**options))
    randomize(model)
    return model


def randomize(model) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                value = torch.randn(p.shape, generator=gen) * 0.02
                p.copy_(value + 1 if "magnitude" in name else value)


def lora_options(r: int = 16, **extra) -> dict:
    return dict(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, **extra)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------ workloads


def train_rows(bench: Bench, base, variant: str, extra: dict) -> None:
    rows, tokens = bench.train_shape
    x = bench.ids(rows, tokens)
    models = {k: wrap(k, base, [lora_options(**extra)]).train() for k in LIBS}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for k, m in models.items()}
    losses = {}

    def lora_step(k):
        def step():
            opts[k].zero_grad(set_to_none=True)
            loss = models[k](input_ids=x, labels=x).loss
            loss.backward()
            opts[k].step()
            losses[k] = loss.detach()
        return step

    def base_step():
        emb = base.get_input_embeddings()(x).detach().requires_grad_()
        base(inputs_embeds=emb, labels=x).loss.backward()

    with torch.no_grad():
        first = {k: m(input_ids=x[:1, :64], labels=x[:1, :64]).logits for k, m in models.items()}
    err = rel_err(first["fastpeft"], first["peft"])
    if err > REL_TOL:
        raise AssertionError(f"{variant}: fastpeft and HF PEFT logits differ (relative error {err:.3g})")
    variants = {"base": base_step, "fastpeft": lora_step("fastpeft"), "peft": lora_step("peft")}
    times = bench.interleaved(variants)
    peaks = {k: bench.peak_mib(fn) for k, fn in variants.items()}
    shape = f"{bench.model_shape}; {rows} x {tokens} tokens; r=16 on 7 projections; AdamW"
    bench.record(f"train {variant}", shape, times, peaks, f"logits fastpeft vs HF rel. error {err:.2g}")


def qlora_rows(bench: Bench, base) -> None:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        bench.record("train QLoRA", bench.model_shape, {}, note=f"skipped: {err}")
        return
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        place = {"device_map": {"": bench.device.index or 0}} if bench.device.type == "cuda" else {}
        try:
            qbase = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, **place)
        except Exception as err:  # e.g. a bitsandbytes build without this device's kernels
            bench.record("train QLoRA", bench.model_shape, {}, note=f"skipped: {type(err).__name__}: {err}")
            return
    qbase.generation_config.pad_token_id = 0
    bench.model_shape, shape = bench.model_shape + " (NF4 base)", bench.model_shape
    try:
        train_rows(bench, qbase.eval(), "QLoRA", {})
    finally:
        bench.model_shape = shape
    del qbase


def decode_rows(bench: Bench, base, n: int) -> None:
    ranks = [8, 16, 32]
    configs = [lora_options(ranks[i % 3]) for i in range(n)]
    models = {k: wrap(k, base, configs).eval() for k in LIBS}
    rows = bench.decode_rows
    x = bench.ids(rows, bench.prompt)
    names = [f"a{i % n}" for i in range(rows)]
    new = dict(max_new_tokens=bench.new, min_new_tokens=bench.new, do_sample=False)
    outs = {}

    def gen(k):
        def fn():
            with torch.no_grad():
                if k == "base":
                    outs[k] = base.generate(input_ids=x, **new)
                else:
                    outs[k] = models[k].generate(input_ids=x, adapter_names=names, **new)
        return fn

    variants = {k: gen(k) for k in ("base", "fastpeft", "peft")}
    for fn in variants.values():
        fn()
    same = (outs["fastpeft"] == outs["peft"]).float().mean().item()
    times = bench.interleaved(variants)
    peaks = {k: bench.peak_mib(fn) for k, fn in variants.items()}
    per_token = {k: v / bench.new for k, v in times.items()}
    shape = (f"{bench.model_shape}; {n} adapters (r 8/16/32) x 7 projections; {rows} rows, prompt "
             f"{bench.prompt}, +{bench.new} tokens (KV cache)")
    bench.record(f"mixed decode, {n} adapters (ms/token)", shape, per_token, peaks,
                 f"greedy tokens equal fastpeft vs HF: {same:.0%}")


# ------------------------------------------------------------------------------------------------ output


def markdown(bench: Bench, meta: dict) -> str:
    dry = " (DRY RUN on the CPU at tiny shapes: the numbers mean nothing)" if meta["dry"] else ""
    lines = [f"GPU benchmark: {meta['device']}, torch {meta['torch']}, peft {meta['peft']}, {meta['date']}, "
             f"medians of {bench.rounds} interleaved rounds{dry}", "",
             "| Workload | Shapes | base ms | fastpeft ms | HF PEFT ms | fastpeft/HF | base/HF | "
             "peak MiB base / fastpeft / HF | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in bench.rows:
        t, p = row["ms"], row["peak_mib"]

        def cell(d, k, fmt="{:.1f}"):
            return fmt.format(d[k]) if d.get(k) is not None else "-"

        ratio = f"{row['fastpeft_over_hf']:.2f}" if "fastpeft_over_hf" in row else "-"
        floor = f"{row['base_over_hf']:.2f}" if "base_over_hf" in row else "-"
        peaks = " / ".join(cell(p, k, "{:.0f}") for k in ("base", "fastpeft", "peft"))
        lines.append(f"| {row['workload']} | {row['shape']} | {cell(t, 'base')} | {cell(t, 'fastpeft')} | "
                     f"{cell(t, 'peft')} | {ratio} | {floor} | {peaks} | {row['note']} |")
    return "\n".join(lines) + "\n"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu_results", help="path prefix of the .json and .md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU at tiny shapes, 1 round: checks the script, not the speed")
    parser.add_argument("--skip", default="", help="comma-separated: lora,dora,qlora,decode")
    return parser.parse_args()


def main() -> int:
    args = parse()
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device and torch.cuda.is_available() is False here. "
              "Run it on a GPU machine, or pass --dry-run for a CPU smoke run of the same code paths at "
              "tiny shapes (its numbers mean nothing).", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    bench = Bench(device, "dry" if args.dry_run else "gpu", 1 if args.dry_run else args.rounds)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
            "torch": torch.__version__, "peft": peft.__version__, "dry": args.dry_run,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(meta), flush=True)
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    base = bench.base()
    if "lora" not in skip:
        train_rows(bench, base, "LoRA", {})
    if "dora" not in skip:
        train_rows(bench, base, "DoRA", {"use_dora": True})
    if "decode" not in skip:
        for n in bench.adapter_counts:
            decode_rows(bench, base, n)
    if "qlora" not in skip:
        qlora_rows(bench, base)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": bench.rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(bench, meta))
    print(f"wrote {args.out}.json and {args.out}.md in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
