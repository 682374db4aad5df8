"""Adapter injection, saving and loading speed: fastpeft vs HF PEFT, in one process.

Run: `.venv/bin/python benchmarks/load_speed.py [--layers 48] [--hidden 64] [--repeats 7] [--threads 1]`.

For a tiny Llama with many layers (where the per-module Python work dominates) and LoRA r=8 on "all-linear"
and on q/v, times: `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained` of a saved adapter and
`load_adapter` of a second one (both saved by HF PEFT), and `PeftModel.from_pretrained` of an adapter saved by
fastpeft (its file holds fastpeft's base fingerprint, which fastpeft checks on load). Before timing it checks
that both libraries give the same outputs from the same adapter file (each library loads the file the other
saved). The base model is copied outside the timed region. Rounds alternate the two libraries; the table shows
medians and fastpeft / HF PEFT (below 1: fastpeft is faster).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402

LIBS = {"peft": peft, "fastpeft": fastpeft}
TARGETS = {"all-linear": "all-linear", "q/v": ["q_proj", "v_proj"]}


def make_base(layers: int, hidden: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def lora_config(lib, targets, init=False):
    """init=False: B random too, so saved adapters change the outputs (checks can fail); True: LoRA's
    default."""
    return lib.LoraConfig(r=8, lora_alpha=16, target_modules=copy.copy(targets), init_lora_weights=init)


def check_outputs(base, targets, workdir: str) -> None:
    """Each library loads the adapter the other saved; both give the same logits."""
    ids = torch.arange(12).reshape(2, 6) % 100
    saved = {}
    for seed, (name, lib) in enumerate(LIBS.items()):
        torch.manual_seed(seed)  # different adapters, so a mix-up of the two files shows
        model = lib.get_peft_model(copy.deepcopy(base), lora_config(lib, targets))
        saved[name] = os.path.join(workdir, f"check_{name}")
        model.save_pretrained(saved[name])
    outs = []
    for loader, source in (("fastpeft", "peft"), ("peft", "fastpeft"), ("fastpeft", "fastpeft")):
        model = LIBS[loader].PeftModel.from_pretrained(copy.deepcopy(base), saved[source])
        model.load_adapter(saved["peft" if source == "fastpeft" else "fastpeft"], "second")
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
            model.set_adapter("second")
            outs.append(model(input_ids=ids).logits)
    # outs: fp(peft file), fp+load_adapter(fp file), peft(fp file), peft+load_adapter(peft file), fp(fp file),
    # fp+load_adapter(peft file)
    assert not torch.allclose(outs[0], outs[4]), "the two adapters should differ"
    for fp_out, hf_out in ((0, 3), (5, 3), (4, 2), (1, 2)):
        torch.testing.assert_close(outs[fp_out], outs[hf_out], atol=1e-5, rtol=0)


def workloads(lib, base, targets, workdir: str, first: str, second: str, first_fp: str):
    """{workload: (setup() -> state, timed(state))}; only `timed` is measured. `first` and `second` were saved
    by HF PEFT (no base fingerprint, so fastpeft has nothing to check); `first_fp` by fastpeft: loading it
    includes fastpeft's base-fingerprint check (HF PEFT ignores the fingerprint)."""
    def inject(model):
        lib.get_peft_model(model, lora_config(lib, targets, init=True))

    def save(model):
        model.save_pretrained(tempfile.mkdtemp(dir=workdir))

    def load(model):
        lib.PeftModel.from_pretrained(model, first)

    def load_second(model):
        model.load_adapter(second, "second")

    def load_fp_file(model):
        lib.PeftModel.from_pretrained(model, first_fp)

    return {
        "get_peft_model": (lambda: copy.deepcopy(base), inject),
        "save_pretrained": (lambda: lib.get_peft_model(copy.deepcopy(base), lora_config(lib, targets)), save),
        "from_pretrained": (lambda: copy.deepcopy(base), load),
        "load_adapter": (lambda: lib.PeftModel.from_pretrained(copy.deepcopy(base), first), load_second),
        "from_pretrained, fastpeft file": (lambda: copy.deepcopy(base), load_fp_file),
    }


def time_once(setup, timed) -> float:
    """ms of `timed(setup())`; garbage collection is run before and kept out of the timed call (as timeit
    does), since a collection landing in it costs tens of ms here (the whole base model is scanned) whichever
    library runs."""
    state = setup()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        timed(state)
        return (time.perf_counter() - start) * 1e3
    finally:
        gc.enable()


def bench(base, targets, workdir: str, repeats: int) -> dict[str, dict[str, float]]:
    first, second = os.path.join(workdir, "first"), os.path.join(workdir, "second")
    for path, seed in ((first, 2), (second, 3)):
        torch.manual_seed(seed)
        peft.get_peft_model(copy.deepcopy(base), lora_config(peft, targets)).save_pretrained(path)
    first_fp = os.path.join(workdir, "first_fp")
    torch.manual_seed(2)
    fastpeft.get_peft_model(copy.deepcopy(base), lora_config(fastpeft, targets)).save_pretrained(first_fp)
    jobs = {name: workloads(lib, base, targets, workdir, first, second, first_fp)
            for name, lib in LIBS.items()}
    times = {name: {w: [] for w in jobs[name]} for name in LIBS}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name in LIBS if round_ % 2 else reversed(LIBS):  # alternate which library goes first
            for work, (setup, timed) in jobs[name].items():
                t = time_once(setup, timed)
                if round_:
                    times[name][work].append(t)
    return {name: {w: statistics.median(v) for w, v in per.items()} for name, per in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = make_base(args.layers, args.hidden)
    print(f"Llama {args.layers} layers, hidden {args.hidden}; LoRA r=8; median of {args.repeats} rounds (ms)")
    print(f"{'targets':<11} {'workload':<31} {'HF PEFT':>9} {'fastpeft':>9} {'fp / HF':>8}")
    for label, targets in TARGETS.items():
        with tempfile.TemporaryDirectory() as workdir:
            check_outputs(base, targets, workdir)
            medians = bench(base, targets, workdir, args.repeats)
        for work, hf in medians["peft"].items():
            fp = medians["fastpeft"][work]
            print(f"{label:<11} {work:<31} {hf:9.1f} {fp:9.1f} {fp / hf:8.2f}")


if __name__ == "__main__":
    main()
