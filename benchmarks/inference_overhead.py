"""Unmerged single-adapter inference: base model vs fastpeft vs HF PEFT forward time, in one process.

Run: `.venv/bin/python benchmarks/inference_overhead.py [--quick] [--rounds N] [--threads 1]`
(or `python -m benchmarks.inference_overhead`). A small Llama with one LoRA adapter (r=16, all-linear, not
merged) in each library and the bare base model (same weights), under `inference_mode`. Logits are checked
equal first. Prints each library's overhead over the base model and fastpeft / HF PEFT (target: no worse,
<= 1.0).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from common import base_parser, check_close, header, interleaved, ratio_line, rounds  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402

# (hidden, intermediate, layers, heads, vocab)
SIZES = {"full": (512, 1024, 4, 8, 1000), "quick": (256, 512, 2, 4, 1000)}
# (label, batch, tokens per row)
SCENARIOS = {"full": [("prefill 4 x 256 tokens", 4, 256), ("decode 16 x 1 token", 16, 1)],
             "quick": [("prefill 2 x 128 tokens", 2, 128), ("decode 8 x 1 token", 8, 1)]}


def base_model(size: str) -> LlamaForCausalLM:
    hidden, inter, layers, heads, vocab = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def adapted(lib, size: str):
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = lib.get_peft_model(base_model(size), config)
    torch.manual_seed(1)  # a trained-looking adapter (B != 0), the same in both libraries
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.02)
    return model.eval()


def forward(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def run_scenario(models: dict, label: str, rows: int, tokens: int, n_rounds: int) -> None:
    vocab = models["base"].config.vocab_size
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(2))
    check_close(forward(models["fastpeft"], ids), forward(models["peft"], ids), f"{label}: logits", atol=1e-4,
                rtol=1e-4)
    t = interleaved({name: (lambda m=m: forward(m, ids)) for name, m in models.items()}, n_rounds)
    base = t["base"]
    print(f"{label}: base model {base:.2f} ms; adapter overhead over base: fastpeft "
          f"{100 * (t['fastpeft'] / base - 1):+.0f}%, HF PEFT {100 * (t['peft'] / base - 1):+.0f}%")
    print(ratio_line(f"unmerged forward, {label}", t["fastpeft"], t["peft"], "ms", 1.0))


def main() -> None:
    args = base_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    size = "quick" if args.quick else "full"
    hidden, inter, layers, _, vocab = SIZES[size]
    print(f"Llama hidden {hidden}, intermediate {inter}, {layers} layers, vocab {vocab}; one "
          "LoRA r=16 all-linear")
    n_rounds = 3 * rounds(args)  # a forward is quick: three times the usual rounds
    print(f"{n_rounds} interleaved rounds per scenario (base model, fastpeft, HF PEFT)")
    models = {"base": base_model(size), "fastpeft": adapted(fastpeft, size), "peft": adapted(peft, size)}
    for label, rows, tokens in SCENARIOS[size]:
        run_scenario(models, label, rows, tokens, n_rounds)


if __name__ == "__main__":
    main()
