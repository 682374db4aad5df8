"""DoRA training step (forward + backward) on a wide Linear stack: fastpeft vs HF PEFT, in one process.

Run: `.venv/bin/python benchmarks/dora.py [--hidden 2048] [--tokens 8] [--threads 1] [--repeats 15]`.
Prints median ms per step for each library and the ratio HF PEFT / fastpeft (above 1: fastpeft is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastpeft  # noqa: E402


class Stack(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build(lib, hidden: int, layers: int, r: int, device: str):
    torch.manual_seed(0)
    config = lib.LoraConfig(target_modules=["layers." + str(i) for i in range(layers)], r=r, use_dora=True)
    model = lib.get_peft_model(Stack(hidden, layers), config).to(device)
    with torch.no_grad():  # a trained-looking adapter (B != 0)
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model.train()


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def timed(model, x, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {lib.__name__: build(lib, args.hidden, args.layers, args.r, device) for lib in (peft, fastpeft)}
    x = torch.randn(args.tokens, args.hidden, device=device)
    outs = {name: m(x) for name, m in models.items()}
    torch.testing.assert_close(outs["fastpeft"], outs["peft"], atol=1e-5, rtol=0)
    for m in models.values():  # warm-up
        step(m, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both
        for name, m in models.items():
            times[name].append(timed(m, x, device))
    hf, fp = (statistics.median(times[n]) for n in ("peft", "fastpeft"))
    print(f"device={device} hidden={args.hidden} layers={args.layers} tokens={args.tokens} r={args.r} "
          f"threads={args.threads}")
    print(f"HF PEFT {hf:.2f} ms | fastpeft {fp:.2f} ms | HF / fastpeft {hf / fp:.2f}x")


if __name__ == "__main__":
    main()
