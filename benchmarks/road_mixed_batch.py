"""RoAd serving many adapters in one batch (one adapter per row): fastpeft vs HF PEFT vs the bare base model.

Run: `.venv/bin/python benchmarks/road_mixed_batch.py [--quick] [--rounds N] [--threads 1] [--hidden 256]
[--kv-cache 0] [--variant road_1] [--group-size 64] [--clock wall|cpu] [--only TEXT]`.

Same Llama shapes as `mixed_batch.py` (hidden H, intermediate 2H, heads H/64, 2 layers, vocab 1000). 64 RoAd
adapters (`RoadConfig(variant, group_size)`) on all 7 linear projections (q/k/v/o/gate/up/down: LoRA-style
"all linear", rather than the config's default q/v), random angles and scales, the same in both libraries.
Rows are assigned round-robin to the scenario's adapters (`a0 a1 a2 a0 ...`). Before timing, fastpeft's logits
must equal HF PEFT's (atol 1e-4); then `model(input_ids, adapter_names=[...])` under `inference_mode` is timed
for HF PEFT, fastpeft (its mixed-batch path: each row's rotation coefficients gathered and applied in one
pass) and the bare base model (no adapters: the floor), interleaved (order reversed every other round),
medians. Ratios: below 1, faster than HF PEFT. `--kv-cache N`: decode rows continue an N-token prefix held in
a KV cache (prefilled once per model, a fresh copy per call, copied outside the timing).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from common import base_parser, check_close, rounds  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 64
VOCAB = 1000
LAYERS = 2
# (label, distinct adapters, batch rows, tokens per row)
SCENARIOS = [
    ("64 adapters x decode", 64, 64, 1),
    ("16 adapters x decode", 16, 32, 1),
    ("4 adapters x decode", 4, 32, 1),
    ("4 adapters x 128 tokens", 4, 8, 128),
]


def base_model(hidden: int) -> LlamaForCausalLM:
    heads = max(hidden // 64, 1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=LAYERS, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def with_adapters(lib, hidden: int, variant: str, group_size: int):
    def config():
        return lib.RoadConfig(variant=variant, group_size=group_size, target_modules=TARGETS)

    model = lib.get_peft_model(base_model(hidden), config(), adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.add_adapter(f"a{i}", config())
    torch.manual_seed(1)  # same random angles / scales in both libraries (same sorted parameter names)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".road_theta." in name:
                param.copy_(torch.randn(param.shape) * 0.5)
            elif ".road_alpha." in name:
                param.copy_(1.0 + torch.randn(param.shape) * 0.2)
    return model.eval()


def interleaved(variants: dict, n_rounds: int, clock, setup, warmup: int = 2) -> dict[str, float]:
    """Median ms of each `variants[label](*setup(label))` by `clock` (setup untimed); every round runs each
    once, order reversed every other round (as common.interleaved, with a choice of clock and an untimed
    per-call setup, as in mixed_batch.py)."""
    labels = list(variants)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(warmup + n_rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            args = setup(label)
            start = clock()
            variants[label](*args)
            if i >= warmup:
                times[label].append((clock() - start) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


def prefilled(models: dict, names: list[str], batch: int, kv: int) -> dict[str, object]:
    """label -> KV cache of a `kv`-token prefix, made by the model (and adapters) that label times."""
    if kv == 0:
        return {}
    prefix = torch.randint(0, VOCAB, (batch, kv), generator=torch.Generator().manual_seed(3))
    caches = {}
    with torch.inference_mode():
        for label, model in models.items():
            kwargs = {} if label == "base" else {"adapter_names": names}
            caches[label] = model(input_ids=prefix, use_cache=True, **kwargs).past_key_values
    return caches


def run_scenario(models: dict, n_adapters: int, batch: int, tokens: int, n_rounds: int, clock,
                 kv: int) -> dict[str, float]:
    names = [f"a{i % n_adapters}" for i in range(batch)]
    ids = torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(2))
    caches = prefilled(models, names, batch, kv if tokens == 1 else 0)

    def setup(label):  # a fresh copy of the prefix cache per call (a forward appends to it)
        return (copy.deepcopy(caches[label]),) if caches else (None,)

    def call(model, past, **kwargs):
        with torch.inference_mode():
            return model(input_ids=ids, past_key_values=past, **kwargs).logits

    variants = {"hf": lambda past: call(models["hf"], past, adapter_names=names),
                "fastpeft": lambda past: call(models["fastpeft"], past, adapter_names=names),
                "base": lambda past: call(models["base"], past)}
    expected = variants["hf"](*setup("hf"))
    check_close(variants["fastpeft"](*setup("fastpeft")), expected,
                f"RoAd {n_adapters} adapters, {batch} x {tokens}", atol=1e-4, rtol=1e-4)
    if torch.allclose(expected, variants["base"](*setup("base")), atol=1e-3):
        raise AssertionError("the adapters do not change the logits: the check would prove nothing")
    return interleaved(variants, n_rounds, clock, setup)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=256,
                        help="Llama hidden size (intermediate 2x, heads /64)")
    parser.add_argument("--kv-cache", type=int, default=0,
                        help="decode rows continue a prefix of this many tokens")
    parser.add_argument("--variant", default="road_1", choices=["road_1", "road_2", "road_4"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.thread_time (this thread's CPU time)")
    parser.add_argument("--only", default="", help="run the scenarios whose label contains this text")
    args = parser.parse_args()
    n_rounds = rounds(args)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    h = args.hidden
    models = {"hf": with_adapters(peft, h, args.variant, args.group_size),
              "fastpeft": with_adapters(fastpeft, h, args.variant, args.group_size),
              "base": base_model(h)}
    past = f"{args.kv_cache}-token KV cache" if args.kv_cache else "no past"
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} thread(s), {n_rounds} "
          f"interleaved rounds{' (--quick)' if args.quick else ''}, {args.clock} clock")
    print(f"Llama: hidden {h}, intermediate {2 * h}, heads {max(h // 64, 1)}, {LAYERS} layers, "
          f"vocab {VOCAB}; "
          f"{N_ADAPTERS} RoAd adapters ({args.variant}, group_size {args.group_size}) on all 7 projections; "
          f"decode rows: one token each, {past}")
    rows = []
    for label, n, batch, tokens in SCENARIOS:
        if args.only in label:
            t = run_scenario(models, n, batch, tokens, n_rounds, clock, args.kv_cache)
            rows.append((label, batch, tokens, t))
    print(f"| {'scenario':24} | rows | tokens/row | HF PEFT ms | fastpeft ms | base ms | fastpeft / HF "
          "| base / HF |")
    print(f"|{'-' * 26}|-----:|-----------:|-----------:|------------:|--------:|--------------:"
          "|----------:|")
    for label, batch, tokens, t in rows:
        print(f"| {label:24} | {batch:4} | {tokens:10} | {t['hf']:10.2f} | {t['fastpeft']:11.2f} | "
              f"{t['base']:7.2f} | {t['fastpeft'] / t['hf']:13.2f} | {t['base'] / t['hf']:9.2f} |")


if __name__ == "__main__":
    main()
