"""DoRA training step (forward + backward) on a stack of wide Linears: fastpeft vs HF PEFT vs the bare base
model.

Run: `.venv/bin/python benchmarks/dora.py [--hidden 2048] [--layers 4] [--tokens 8 512 2048] [--rounds 9]`.
One process builds the three models (same weights), checks that the DoRA outputs agree, then times one step
per token count with the libraries alternating inside each round (order reversed every other round, medians;
benchmarks/common.py `interleaved`). The base model's step (frozen weights, input gradient formed) is the
floor. Ratios are fastpeft / HF PEFT: below 1, fastpeft is faster.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from common import base_parser, check_close, header, interleaved, rounds  # noqa: E402
from torch import nn  # noqa: E402

import fastpeft  # noqa: E402

TOKENS = {"full": [8, 512, 2048], "quick": [8, 256]}


class Stack(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def base(hidden: int, layers: int) -> Stack:
    torch.manual_seed(0)
    return Stack(hidden, layers)


def frozen_base(hidden: int, layers: int) -> Stack:
    """The floor: the same stack with frozen weights, backward run for the input's gradient (what an adapter
    below a layer needs from it), so only the adapters' own work is missing."""
    model = base(hidden, layers).train()
    model.requires_grad_(False)
    return model


def build(lib, hidden: int, layers: int, r: int):
    config = lib.LoraConfig(target_modules=["layers." + str(i) for i in range(layers)], r=r, use_dora=True)
    model = lib.get_peft_model(base(hidden, layers), config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (B != 0), the same in both libraries
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model.train()


def step(model, x) -> None:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)  # the same for all three models: the stack's input gradient is formed
    model(x).square().mean().backward()


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (rows of x)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    models = {"peft": build(peft, args.hidden, args.layers, args.r),
              "fastpeft": build(fastpeft, args.hidden, args.layers, args.r),
              "base": frozen_base(args.hidden, args.layers)}
    print(f"Linear stack: {args.layers} x nn.Linear({args.hidden}, {args.hidden}) + tanh, DoRA r={args.r} on "
          "every layer; one step = forward, mean-square loss, backward")
    print(f"{'tokens':>7} | {'HF PEFT ms':>10} | {'fastpeft ms':>11} | {'base ms':>8} | "
          f"{'fastpeft / HF':>13} | {'base / HF':>9}")
    for tokens in args.tokens or TOKENS["quick" if args.quick else "full"]:
        x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(2))
        check_close(models["fastpeft"](x), models["peft"](x), f"{tokens} tokens: outputs",
                    atol=1e-5, rtol=1e-5)
        t = interleaved({name: (lambda m=m, x=x: step(m, x)) for name, m in models.items()}, rounds(args))
        print(f"{tokens:>7} | {t['peft']:>10.2f} | {t['fastpeft']:>11.2f} | {t['base']:>8.2f} | "
              f"{t['fastpeft'] / t['peft']:>13.2f} | {t['base'] / t['peft']:>9.2f}")


if __name__ == "__main__":
    main()
