"""LoRA at real model shapes: fastpeft vs HF PEFT vs the bare base model, in one process.

Run: `.venv/bin/python benchmarks/real_shapes.py [--quick] [--rounds N] [--clock cpu|wall]
[--dtype bf16|fp32]`
(`make bench` runs --quick, `make bench-full` the full run; nothing else should run meanwhile).

Model: Llama-3.2-1B-shaped decoder layers (hidden 2048, intermediate 8192, 32 heads / 8 KV heads, head dim 64;
vocab cut to 32000 to keep memory down), 2 layers in --quick (256-token prefill / train), 8 in the full run,
plus a hidden-4096 model (Llama-2-7B layers: intermediate 11008, 32 heads, 32 KV heads) with 2 layers in the
full run. Weights random, bf16 by default (the dev CPU has AMX/AVX512-BF16: a 512 x 2048 x 5632 bf16 matmul
runs ~6x faster than fp32 on one thread). One LoRA adapter, r=16, alpha 32, on q,k,v,o,gate,up,down, with B !=
0 (a trained-looking adapter, the same weights in both libraries); adapter weights are float32 (both
libraries' default `autocast_adapter_dtype=True`).

The three variants share one set of base weights (the LoRA models are deep copies of the base model whose
memo maps every base Parameter to itself), so a hidden-2048 x 8-layer model costs ~1.5 GB once, not three
times. Workloads, each with its shapes printed on its line:
- decode: `generate` with a KV cache, greedy, a fixed number of new tokens (min = max), batch 1 / 8 / 32
  (quick: 1 / 8): ms per new token (whole call, prefill of the prompt included, / new tokens)
- prefill: one forward of batch x prompt tokens with `use_cache=True`
- train: one step of forward + loss + backward + AdamW on the LoRA weights; the base floor is forward +
  backward of the bare model with respect to its input embeddings (the same backward through every layer,
  no weight gradients)
- merge: `merge_and_unload()` of a fresh copy (setup, untimed: a real deep copy of the LoRA model), and a
  check that both merged models give the same logits; a merged model is the bare model, so its decode time
  is the base row.
Before timing, fastpeft's and HF PEFT's logits, greedy tokens and LoRA gradients are checked equal (bf16
tolerances), and the adapter is checked to move the logits by much more than the tolerance.

Timing: medians of interleaved rounds (base, fastpeft, HF PEFT; the order reversed every other round), one
torch thread. `--clock cpu` (default) times with `time.thread_time`, the CPU time of this thread, so other
processes on a shared machine slow the numbers less than wall time; `--clock wall` uses perf_counter.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import fastpeft  # noqa: E402

hf_logging.set_verbosity_error()
LIBS = {"fastpeft": fastpeft, "peft": peft}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# name -> (hidden, intermediate, heads, kv heads, vocab)
FAMILIES = {"llama-1b": (2048, 8192, 32, 8, 32000), "llama-7b": (4096, 11008, 32, 32, 32000)}

# Each plan: (family, layers, decode batches, prompt tokens, new tokens, prefill (batch, tokens) list,
# train (batch, tokens) list)
PLANS = {
    "quick": [("llama-1b", 2, [1, 8], 32, 4, [(1, 256)], [(1, 256)])],
    "full": [
        ("llama-1b", 8, [1, 8, 32], 32, 8, [(2, 512)], [(1, 1024)]),  # 1 x 2048: 7 GB RSS, over the 6 GB cap
        ("llama-7b", 2, [1, 32], 32, 8, [(1, 512)], [(1, 512)]),
    ],
}


# ------------------------------------------------------------------------------------------------ timing


def clock_fn(name: str):
    return time.thread_time if name == "cpu" else time.perf_counter


def interleaved(variants: dict, rounds: int, clock, warmup: int = 1, setup=None) -> dict[str, float]:
    """Median ms of each `variants[label](arg)`; `arg = setup(label)` is made untimed before each call (None
    without setup). Every round calls every variant once, the order reversed every other round; garbage is
    collected before and the collector is off during each timed call."""
    labels = list(variants)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(warmup + rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            arg = setup(label) if setup else None
            gc.collect()
            gc.disable()
            try:
                start = clock()
                variants[label](arg)
                elapsed = (clock() - start) * 1e3
            finally:
                gc.enable()
            del arg
            if i >= warmup:
                times[label].append(elapsed)
    return {label: statistics.median(v) for label, v in times.items()}


def row(workload: str, shape: str, t: dict[str, float], unit: str = "ms", per: float = 1.0) -> str:
    base = t.get("base")
    fp, hf = t["fastpeft"] / per, t["peft"] / per
    floor = f"base {base / per:9.2f} | " if base is not None else " " * 17 + "| "
    base_ratio = f" | base/HF {base / per / hf:5.2f}" if base is not None else ""
    return (f"{workload:7} {shape:46} {floor}fastpeft {fp:9.2f} | HF PEFT {hf:9.2f} {unit:7} | "
            f"fastpeft/HF {fp / hf:5.2f}{base_ratio}")


# ------------------------------------------------------------------------------------------------ models


def build_base(family: str, layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, inter, heads, kv, vocab = FAMILIES[family]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, attn_implementation="sdpa", torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        base = LlamaForCausalLM(cfg)
        for p in base.parameters():  # plain normal init: fast at 1B parameters, and gives varied tokens
            if p.dim() == 2:
                p.normal_(0, 0.02)
    base.generation_config.pad_token_id = 0
    # torch's matmul does not fold a non-contiguous 3-D input into one mm when the weight is frozen: it
    # expands the weight per row instead (a bmm over an (8, 2048, 32000) copy of lm_head's weight at batch 8:
    # 5 s of a 5.4 s `generate` call, measured with torch 2.13 on the CPU; at batch 1, 0.5 s of 0.64 s).
    # generate's prefill hands lm_head the slice hidden[:, -1:], so the hook below gives lm_head an input with
    # fresh strides, in all three variants alike (the LoRA models are copies of this module, hooks included).
    base.lm_head.register_forward_pre_hook(_contiguous_input)
    return base.to(dtype).eval()


def _contiguous_input(module, args):
    x = args[0]  # hidden[:1, -1:] counts as contiguous but keeps the full strides: copy to fresh ones
    return (torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x),) + tuple(args[1:])


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `base` whose parameters are base's own Parameter objects (no second copy of weights)."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def wrap(lib_name: str, base: torch.nn.Module):
    lib = LIBS[lib_name]
    config = lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                            task_type="CAUSAL_LM")
    model = lib.get_peft_model(shared_copy(base), config)
    gen = torch.Generator().manual_seed(1)  # the same adapter weights in both libraries, B != 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def ids(batch: int, tokens: int, vocab: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ checks


def check(models: dict, vocab: int, new_tokens: int) -> None:
    """fastpeft and HF PEFT agree on logits and greedy tokens; the adapter effect is far above the
    tolerance."""
    x = ids(2, 32, vocab)
    with torch.no_grad():
        logits = {k: m(input_ids=x).logits.float() for k, m in models.items()}
        gen = {k: m.generate(input_ids=x, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False) for k, m in models.items() if k != "base"}
    diff = (logits["fastpeft"] - logits["peft"]).abs().max().item()
    effect = (logits["peft"] - logits["base"]).abs().max().item()
    scale = logits["peft"].abs().max().item()
    tol = 2e-2 * scale  # bf16: 8 bits of mantissa, and both libraries round in different places
    if diff > tol or effect < 10 * diff:
        raise AssertionError(f"logits: fastpeft vs HF max diff {diff:.3g} (tolerance {tol:.3g}), "
                             f"adapter effect {effect:.3g}")
    same = (gen["fastpeft"] == gen["peft"]).float().mean().item()
    print(f"  check: logits fastpeft vs HF max |diff| {diff:.3g} (|logits| <= {scale:.3g}; adapter effect "
          f"{effect:.3g}); greedy tokens equal: {same:.0%}")


def check_grads(models: dict, x: torch.Tensor) -> None:
    grads = {}
    for k in ("fastpeft", "peft"):
        models[k].zero_grad(set_to_none=True)
        models[k](input_ids=x, labels=x).loss.backward()
        grads[k] = {n.replace(".default", ""): p.grad.float() for n, p in models[k].named_parameters()
                    if p.grad is not None}
        models[k].zero_grad(set_to_none=True)
    if sorted(grads["fastpeft"]) != sorted(grads["peft"]):
        raise AssertionError("fastpeft and HF PEFT train different parameters")
    worst = max(((grads["fastpeft"][n] - g).norm() / g.norm()).item() for n, g in grads["peft"].items())
    if worst > 5e-2:
        raise AssertionError(f"LoRA gradients differ: worst relative norm diff {worst:.3g}")
    print(f"  check: {len(grads['peft'])} LoRA gradients, worst relative diff fastpeft vs HF {worst:.3g} "
          f"(bf16)")


# ------------------------------------------------------------------------------------------------ workloads


def bench_decode(models, batches, prompt, new, vocab, rounds, clock, shape):
    for b in batches:
        x = ids(b, prompt, vocab)

        def run(m, x=x):
            return lambda _: m.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        with torch.no_grad():
            t = interleaved({k: run(m) for k, m in models.items()}, rounds, clock)
        print(row("decode", f"{shape}, batch {b}, prompt {prompt}, +{new} tokens", t, "ms/tok", per=new),
              flush=True)


def bench_prefill(models, sizes, vocab, rounds, clock, shape):
    for b, n in sizes:
        x = ids(b, n, vocab)
        with torch.no_grad():
            t = interleaved({k: (lambda _, m=m, x=x: m(input_ids=x, use_cache=True))
                             for k, m in models.items()}, rounds, clock)
        print(row("prefill", f"{shape}, {b} x {n} tokens", t), flush=True)


def bench_train(models, sizes, vocab, rounds, clock, shape):
    base = models["base"]
    opts = {k: torch.optim.AdamW([p for p in models[k].parameters() if p.requires_grad], lr=1e-4)
            for k in ("fastpeft", "peft")}

    def lora_step(k):
        def step(_):
            opts[k].zero_grad(set_to_none=True)
            models[k](input_ids=x, labels=x).loss.backward()
            opts[k].step()
        return step

    def base_step(_):
        emb = base.get_input_embeddings()(x).detach().requires_grad_()
        base(inputs_embeds=emb, labels=x).loss.backward()

    for b, n in sizes:
        x = ids(b, n, vocab)
        check_grads(models, x[:, :128])
        for m in models.values():
            m.train()
        t = interleaved({"base": base_step, "fastpeft": lora_step("fastpeft"), "peft": lora_step("peft")},
                        rounds, clock)
        for m in models.values():
            m.eval()
        print(row("train", f"{shape}, {b} x {n} tokens, AdamW", t), flush=True)


def bench_merge(models, vocab, rounds, clock, shape):
    x = ids(1, 32, vocab)
    merged = {}

    def merge(k):
        def fn(model):
            merged[k] = model.merge_and_unload()
        return fn

    def fresh(k):  # a real copy: merging writes the base weights, which the three variants share
        merged.pop(k, None)  # at most one merged copy per library alive (memory)
        gc.collect()
        return copy.deepcopy(models[k])

    t = interleaved({k: merge(k) for k in ("fastpeft", "peft")}, max(1, rounds // 2), clock, setup=fresh)
    with torch.no_grad():
        ref = models["peft"](input_ids=x).logits.float()
        a, b = (merged[k](input_ids=x).logits.float() for k in ("fastpeft", "peft"))
    merged.clear()
    # each merged weight is rounded to bf16 once more than the unmerged path: compare relative norms
    errs = [((m - ref).norm() / ref.norm()).item() for m in (a, b)]
    between = ((a - b).norm() / b.norm()).item()
    if between > 2 * max(errs):  # the two merged models must be as close as each is to the unmerged one
        raise AssertionError(f"merged models differ: relative error {between:.3g} (vs unmerged: {errs})")
    print(f"  check: merged logits fastpeft vs HF relative error {between:.3g}; vs the unmerged model: "
          f"fastpeft {errs[0]:.3g}, HF {errs[1]:.3g}")
    print(row("merge", f"{shape}, merge_and_unload (a merged model is the base row)", t), flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_plan(plan, args, clock) -> None:
    family, layers, batches, prompt, new, prefills, trains = plan
    hidden, inter, heads, kv, vocab = FAMILIES[family]
    dtype = DTYPES[args.dtype]
    shape = f"h{hidden}/i{inter} x{layers}L {args.dtype}"
    print(f"\n{family}-shaped: hidden {hidden}, intermediate {inter}, {layers} layers, {heads} heads / "
          f"{kv} KV heads, vocab {vocab}, {args.dtype}; LoRA r=16 alpha 32 on "
          f"{','.join(TARGETS)} (fp32 adapter)",
          flush=True)
    base = build_base(family, layers, dtype)
    models = {"base": base, "fastpeft": wrap("fastpeft", base), "peft": wrap("peft", base)}
    check(models, vocab, new)
    print(f"  peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    bench_decode(models, batches, prompt, new, vocab, args.rounds, clock, shape)
    if args.decode_only:
        return
    bench_prefill(models, prefills, vocab, args.rounds, clock, shape)
    bench_train(models, trains, vocab, args.rounds, clock, shape)
    print(f"  peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)
    if not args.quick:
        bench_merge(models, vocab, args.rounds, clock, shape)
    print(f"  peak RSS {peak_rss_gib():.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="hidden 2048 x 2 layers only, 256-token prefill / train, 2 rounds (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--only", default=None, help="run only the plan of this family (llama-1b / llama-7b)")
    parser.add_argument("--batches", default=None, help="decode batch sizes instead of the plan's, e.g. 1,8")
    parser.add_argument("--decode-only", action="store_true", help="skip prefill, train and merge")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    print(f"torch {torch.__version__}, peft {peft.__version__}, 1 thread, {mode} mode, clock {args.clock}, "
          f"{args.rounds} interleaved rounds (+1 warm-up), medians; "
          "ratios fastpeft/HF below 1: fastpeft better")
    start = time.perf_counter()
    for plan in PLANS[mode]:
        if args.only in (None, plan[0]):
            run_plan(plan, args, clock_fn(args.clock))
            gc.collect()
    print(f"total {time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
