"""Loading many adapters into a big model: fastpeft vs HF PEFT, time and peak resident memory.

Run: `.venv/bin/python benchmarks/big_model_load.py [--quick] [--adapters 100] [--rounds 3] [--clock cpu]`.

A Llama-shaped base (full: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000,
about 1.1B parameters, TinyLlama's shapes) in bfloat16 with random weights is saved once under `--folder` with
`--adapters` LoRA adapters (q_proj / v_proj, ranks 8 and 16 alternating, float32 files as HF PEFT saves them
on a bf16 base). Each measured run is its own process, forked from this one after the imports, so one
library's memory never counts for the other: it loads the base with `from_pretrained(folder, dtype=bfloat16,
device_map="cpu")`, then `PeftModel.from_pretrained` of the first adapter and `load_adapter` of the rest, with
`low_cpu_mem_usage=True` (adapter weights built on the meta device and filled from the file) or without.

Per run: the time of the adapter loads (not the base load), the peak resident memory they add over the loaded
base (VmHWM after a reset, minus the resident size before), the adapters' own bytes, and checks: every base
weight keeps its storage (same data_ptr, never on meta: no copy of any base weight), the last adapter's
weights against its file, and the logits of one short forward with it active in both libraries. Runs
alternate the libraries (fastpeft, HF, HF, fastpeft, ...); the table shows medians. `--clock cpu` times with
`time.thread_time` (1 torch thread), which leaves out waiting for a core on a shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402

LIBS = {"fastpeft": fastpeft, "peft": peft}
SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "full": (2048, 5632, 22, 32, 4, 32000),
    "quick": (512, 1376, 8, 8, 2, 8000),
}
TARGETS = ("q_proj", "v_proj")


def llama_config(shape: tuple[int, ...]) -> LlamaConfig:
    hidden, inter, layers, heads, kv, vocab = shape
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=512, tie_word_embeddings=False, dtype="bfloat16")


def describe(shape: tuple[int, ...], n_params: int | None = None) -> str:
    hidden, inter, layers, heads, kv, vocab = shape
    size = "" if n_params is None else f", {n_params / 1e9:.2f}B params"
    return (f"Llama hidden {hidden}, intermediate {inter}, {layers} layers, {heads}/{kv} heads, "
            f"vocab {vocab}, bf16{size}")


# ------------------------------------------------------------------------------------------------ files


def prepare(folder: str, shape: tuple[int, ...], n_adapters: int) -> None:
    """The base model folder and the adapter folders, built once (random weights; seeded)."""
    base_dir = os.path.join(folder, "base")
    cfg = llama_config(shape)
    if not os.path.exists(os.path.join(base_dir, "config.json")):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model.to_empty(device="cpu")  # no fp32 copy: bf16 storage filled in place
        model.to(torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
        model.save_pretrained(base_dir)
        del model
        gc.collect()
    shapes = _target_shapes(cfg)
    for i in range(n_adapters):
        out = os.path.join(folder, f"adapter_{i}")
        if os.path.exists(os.path.join(out, "adapter_model.safetensors")):
            continue
        rank = 8 if i % 2 == 0 else 16
        peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                        base_model_name_or_path=base_dir).save_pretrained(out)
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for module, (n_in, n_out) in shapes.items():
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})


def _target_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    outs = {"q_proj": cfg.hidden_size, "v_proj": cfg.num_key_value_heads * head_dim}
    return {f"model.layers.{layer}.self_attn.{t}": (cfg.hidden_size, outs[t])
            for layer in range(cfg.num_hidden_layers) for t in TARGETS}


# ------------------------------------------------------------------------------------------------ one run


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)\s+kB", f.read()).group(1))


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_once(lib_name: str, folder: str, n_adapters: int, low: bool, clock: str) -> dict:
    """In a fresh child: load the base, then the adapters; time, memory and checks."""
    torch.set_num_threads(1)
    lib = LIBS[lib_name]
    base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"), dtype=torch.bfloat16,
                                                device_map="cpu")
    storages = {name: (p.data_ptr(), p.untyped_storage().data_ptr()) for name, p in base.named_parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    _trim()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    tick = time.thread_time if clock == "cpu" else time.perf_counter
    start = tick()
    model = lib.PeftModel.from_pretrained(base, os.path.join(folder, "adapter_0"), adapter_name="a0",
                                          low_cpu_mem_usage=low)
    for i in range(1, n_adapters):
        model.load_adapter(os.path.join(folder, f"adapter_{i}"), f"a{i}", low_cpu_mem_usage=low)
    elapsed = (tick() - start) * 1e3
    peak = _status_kib("VmHWM") - before
    after = _status_kib("VmRSS") - before
    moved = [name for name, param in _base_params(model) if param.is_meta
             or (param.data_ptr(), param.untyped_storage().data_ptr()) != storages.get(name)]
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
    last = f"a{n_adapters - 1}"
    weights = lib.get_peft_model_state_dict(model, adapter_name=last)
    model.set_adapter(last)
    ids = torch.arange(1, 9)[None]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float()
        with model.disable_adapter():
            bare = model(input_ids=ids).logits[0, -1].float()
    return {"ms": elapsed, "peak_mib": peak / 1024, "after_mib": after / 1024, "moved": moved,
            "adapter_mib": adapter_bytes / 2 ** 20, "base_mib": base_bytes / 2 ** 20,
            "n_params": sum(p.numel() for p in base.parameters()), "logits": logits,
            "effect": (logits - bare).abs().max().item(),
            "file_diff": _diff_to_file(weights, os.path.join(folder, f"adapter_{n_adapters - 1}"))}


def _diff_to_file(weights: dict[str, torch.Tensor], adapter_dir: str) -> float:
    """Largest |model - file| over the adapter's weights (0.0: the file's values, bit for bit)."""
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    if set(saved) != set(weights):
        return float("inf")
    return max((weights[k].double() - v.double()).abs().max().item() for k, v in saved.items())


def _base_params(model):
    """(name as in the bare base model, parameter) of every base weight of a wrapped model."""
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, param


def in_child(fn, *args):
    """`fn(*args)` in a child forked from this process (which holds the imports and no model)."""
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, 20 adapters, 1 round (< 60 s)")
    parser.add_argument("--adapters", type=int, default=None, help="adapters to load (default 100, quick 20)")
    parser.add_argument("--rounds", type=int, default=None, help="runs per library (default 3, quick 1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--folder", default=None, help="where the base and adapters are saved once")
    parser.add_argument("--no-low", action="store_true", help="also time low_cpu_mem_usage=False")
    args = parser.parse_args()
    kind = "quick" if args.quick else "full"
    shape = SHAPES[kind]
    n_adapters = args.adapters or (20 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 3)
    folder = args.folder or f"/tmp/bigmodels/big_model_load_{kind}"
    start = time.perf_counter()
    in_child(prepare, folder, shape, n_adapters)  # the 2 GB model never lives in this process
    print(f"files ready in {time.perf_counter() - start:.1f} s ({folder})")
    lows = (True, False) if args.no_low else (True,)
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(rounds):
        order = list(LIBS) if r % 2 == 0 else list(LIBS)[::-1]
        for low in lows:
            for lib in order:
                run = in_child(run_once, lib, folder, n_adapters, low, args.clock)
                results.setdefault((lib, low), []).append(run)
    report(results, shape, n_adapters, rounds, args.clock, lows)


def report(results: dict, shape: tuple[int, ...], n_adapters: int, rounds: int, clock: str, lows) -> None:
    first = next(iter(results.values()))[0]
    print(f"\n{describe(shape, first['n_params'])} ({first['base_mib']:.0f} MiB of weights), "
          "device_map='cpu'")
    print(f"{n_adapters} LoRA adapters on {'/'.join(TARGETS)} (r 8/16, fp32 adapter weights: "
          f"{first['adapter_mib']:.1f} MiB in all); {rounds} run(s) per library, {clock} clock, medians")
    for (lib, _), runs in results.items():
        if any(r["moved"] for r in runs):
            print(f"  {lib}: base weights copied or moved: {runs[0]['moved'][:3]}")
    for low in lows:
        ours, theirs = results[("fastpeft", low)], results[("peft", low)]
        diff = (ours[0]["logits"] - theirs[0]["logits"]).abs().max().item()
        print(f"\nlow_cpu_mem_usage={low}: last adapter's weights vs its file, max |model - file|: "
              f"fastpeft {ours[0]['file_diff']:.1e}, HF PEFT {theirs[0]['file_diff']:.1e}; logits with it "
              f"(bf16 base): max |fastpeft - HF| = {diff:.2e}, adapter effect max |with - without| = "
              f"{ours[0]['effect']:.2e}")
        for key, unit in (("ms", "ms"), ("peak_mib", "MiB"), ("after_mib", "MiB")):
            a = statistics.median(r[key] for r in ours)
            b = statistics.median(r[key] for r in theirs)
            print(f"  {key:10} fastpeft {a:10.1f} {unit:3} | HF PEFT {b:10.1f} {unit:3} | "
                  f"fastpeft/HF {a / b:5.2f}")
        print("  every base weight kept its storage: "
              f"fastpeft {all(not r['moved'] for r in ours)}, HF PEFT {all(not r['moved'] for r in theirs)}")
    skip = ("logits",)
    print(json.dumps({f"{lib} low={low}": [{k: v for k, v in r.items() if k not in skip} for r in runs]
                      for (lib, low), runs in results.items()}, default=str)[:4000])


if __name__ == "__main__":
    main()
