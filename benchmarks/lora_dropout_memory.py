"""LoRA training step with dropout: memory kept for backward and time, fastpeft vs HF PEFT, in one process.

Run:
`.venv/bin/python benchmarks/lora_dropout_memory.py [--hidden 256] [--tokens 512] [--threads 1] [--repeats 9]
[--mask-storage bool|regenerate]` (how fastpeft keeps the dropout mask, `lean_dropout.MASK_STORAGE`).

Both libraries get the same Llama (built from a config) with LoRA r=16 on all 7 linear projections,
lora_dropout=0.05, and the same adapter weights. First check: one seeded step gives equal logits and equal
gradients (bit for bit: fastpeft draws the very masks nn.Dropout draws). Then:
- memory: bytes of the distinct storages autograd keeps for backward during the forward
  (`torch.autograd.graph.saved_tensors_hooks`; exact on CPU, no allocator noise), per library, and the same
  with dropout off as a floor; this is the activation memory a training step peaks with;
- time: median ms of a forward + backward step, the libraries interleaved round by round.
Prints fastpeft / HF PEFT ratios (below 1: fastpeft uses less).
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
from fastpeft.methods.lora import lean_dropout  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(lib, args, dropout: float):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.tokens, attn_implementation="eager")
    config = lib.LoraConfig(target_modules=LINEAR, r=16, lora_alpha=32, lora_dropout=dropout)
    model = lib.get_peft_model(LlamaForCausalLM(cfg), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (B != 0), the same in both libraries
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.train()


def step(model, ids, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach()


def check_same(models: dict, ids) -> None:
    logits = {name: step(m, ids) for name, m in models.items()}
    torch.testing.assert_close(logits["fastpeft"], logits["peft"], rtol=0, atol=0)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models.values()]
    assert sorted(grads[0]) == sorted(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def saved_bytes(model, ids) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)  # activations only


def timed(model, ids) -> float:
    start = time.perf_counter()
    step(model, ids)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--mask-storage", choices=["bool", "regenerate"], default=lean_dropout.MASK_STORAGE)
    args = parser.parse_args()
    lean_dropout.MASK_STORAGE = args.mask_storage
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(2))
    models = {lib.__name__: build(lib, args, args.dropout) for lib in (fastpeft, peft)}
    check_same(models, ids)
    mem = {name: saved_bytes(m, ids) for name, m in models.items()}
    floor = {lib.__name__: saved_bytes(build(lib, args, 0.0), ids) for lib in (fastpeft, peft)}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both
        for name, m in models.items():
            times[name].append(timed(m, ids))
    fp_ms, hf_ms = (statistics.median(times[n]) for n in ("fastpeft", "peft"))
    mib = 2.0 ** 20
    print(f"hidden={args.hidden} layers={args.layers} tokens={args.tokens} r=16 dropout={args.dropout} "
          f"threads={args.threads} repeats={args.repeats} mask storage={args.mask_storage}; "
          "outputs and gradients equal (bit for bit)")
    print(f"saved for backward: HF PEFT {mem['peft'] / mib:.2f} MiB | fastpeft {mem['fastpeft'] / mib:.2f} "
          f"MiB | fastpeft / HF {mem['fastpeft'] / mem['peft']:.2f}")
    print(f"  (dropout off: HF PEFT {floor['peft'] / mib:.2f} MiB | fastpeft "
          f"{floor['fastpeft'] / mib:.2f} MiB)")
    print(f"train step: HF PEFT {hf_ms:.1f} ms | fastpeft {fp_ms:.1f} ms | fastpeft / HF {fp_ms / hf_ms:.2f}")


if __name__ == "__main__":
    main()
