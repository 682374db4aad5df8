"""Adapter injection, loading and saving on a deep model: fastpeft vs HF PEFT wall time, in one process.

Run: `.venv/bin/python benchmarks/injection.py [--quick] [--rounds N] [--threads 1]`
(or `python -m benchmarks.injection`). A tiny but deep Llama (48 layers, hidden 64; 336 target Linears) gets
LoRA r=16 on all linear layers. Timed, each on a fresh copy of the base model (the copy is not timed):
`get_peft_model`, `PeftModel.from_pretrained` of a saved adapter, and `save_pretrained`. Checked first: both
libraries' injected adapters hold the same initial weights (same seed), their saved files have the same keys
and tensors, and the loaded models give the same logits. Prints fastpeft / HF PEFT (target <= 0.5). Garbage is
collected before each timed call and the collector is off during it (as `timeit`;
common.interleaved_with_setup).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from common import base_parser, check_close, header, interleaved_with_setup, ratio_line, rounds  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402

LIBS = {"fastpeft": fastpeft, "peft": peft}
LAYERS = {"full": 48, "quick": 24}
TARGET = 0.5
WEIGHTS = "adapter_model.safetensors"


def base_model(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def lora_config(lib):
    return lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def inject(lib, base):
    torch.manual_seed(1)
    return lib.get_peft_model(base, lora_config(lib))


def check(base, folder: str) -> None:
    """Same initial adapter weights (saved files compared key by key), same logits after loading."""
    for name, lib in LIBS.items():
        inject(lib, copy.deepcopy(base)).save_pretrained(os.path.join(folder, name))
    files = {name: load_file(os.path.join(folder, name, WEIGHTS)) for name in LIBS}
    if sorted(files["fastpeft"]) != sorted(files["peft"]):
        raise AssertionError("fastpeft and HF PEFT saved different keys")
    check_close(files["fastpeft"], files["peft"], "injected + saved adapter weights", atol=0, rtol=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    loaded = {}
    for name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(folder, "peft"))
        with torch.no_grad():  # make B non-zero so the adapter shows in the logits
            for key, p in sorted(model.named_parameters()):
                if "lora_B" in key:
                    p.copy_(torch.full(p.shape, 0.01))
            loaded[name] = model(input_ids=ids).logits
    check_close(loaded["fastpeft"], loaded["peft"], "logits after from_pretrained", atol=1e-5, rtol=1e-5)


def timings(base, folder: str, n_rounds: int) -> dict[str, dict[str, float]]:
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    saved = os.path.join(folder, "peft")
    injected = {name: inject(lib, copy.deepcopy(base)) for name, lib in LIBS.items()}
    out_dirs = iter(range(10**6))
    new_dir = lambda: os.path.join(folder, f"out{next(out_dirs)}")  # noqa: E731
    return {
        "get_peft_model": interleaved_with_setup(
            {name: (fresh, lambda b, lib=lib: inject(lib, b)) for name, lib in LIBS.items()}, n_rounds,
            quiet_gc=True),
        "PeftModel.from_pretrained": interleaved_with_setup(
            {name: (fresh, lambda b, lib=lib: lib.PeftModel.from_pretrained(b, saved))
             for name, lib in LIBS.items()},
            n_rounds, quiet_gc=True),
        "save_pretrained": interleaved_with_setup(
            {name: (new_dir, lambda d, m=m: m.save_pretrained(d)) for name, m in injected.items()}, n_rounds,
            quiet_gc=True),
    }


def main() -> None:
    args = base_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    layers = LAYERS["quick" if args.quick else "full"]
    base = base_model(layers)
    print(f"Llama {layers} layers, hidden 64, intermediate 128 ({7 * layers} target Linears); "
          "LoRA r=16 all-linear")
    folder = tempfile.mkdtemp(prefix="fastpeft-bench-")
    try:
        check(base, folder)
        for label, t in timings(base, folder, rounds(args)).items():
            print(ratio_line(f"{label}, {layers} layers", t["fastpeft"], t["peft"], "ms", TARGET))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
