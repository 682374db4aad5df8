"""DoRA training step (forward + backward + AdamW step) on a stack of wide Linears: fastpeft vs HF PEFT vs the
bare base model.

Run: `.venv/bin/python benchmarks/dora.py [--hidden 1024 2048] [--layers 4] [--tokens 512 2048 4096]
[--rounds 9] [--clock cpu]`. One process builds the models (same weights), checks that the DoRA outputs and
gradients agree, then times one step per shape with the libraries alternating inside each round (order
reversed every other round, medians). The base model's step (frozen weights, input gradient formed, nothing to
optimise) is the floor. "fastpeft composed" is fastpeft with its fused DoRA forms switched off
(`variants.dora.FUSED = False`): the same norm, the contribution as composed torch ops; "one-node" is
fastpeft with the one-GEMM form (dora_scaled.py) off (`variants.dora.TOKENS_PER_ROW = inf`): the base layer's
GEMMs plus the one-node contribution (dora_fused.py), the previous round's formulation. Ratios are
fastpeft / HF PEFT: below 1, fastpeft is faster. `--clock cpu` times with `time.thread_time` (1 torch thread:
all the work is on the calling thread), which other processes on a shared machine disturb far less.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from common import base_parser, check_close, header, rounds  # noqa: E402
from torch import nn  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.methods.lora.variants import dora as fp_dora  # noqa: E402

SHAPES = {"full": ([1024, 2048], [512, 2048, 4096]), "quick": ([1024], [512])}


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


def build(lib, hidden: int, layers: int, r: int, dtype=torch.float32, dropout: float = 0.0):
    config = lib.LoraConfig(target_modules=["layers." + str(i) for i in range(layers)], r=r, use_dora=True,
                            lora_dropout=dropout)
    model = lib.get_peft_model(base(hidden, layers), config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (B != 0), the same in both libraries
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model.to(dtype).train()


class Trainer:
    """One training step of `model`: forward, mean-square loss, backward, AdamW step (lr 0: the weights stay
    the same across rounds, the optimizer does all its work)."""

    def __init__(self, model, fused: bool = True, scaled: bool = True):
        self.model, self.fused, self.scaled = model, fused, scaled
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=0.0) if params else None

    def loss(self, x):
        fp_dora.FUSED, tokens_per_row = self.fused, fp_dora.TOKENS_PER_ROW
        if not self.scaled:
            fp_dora.TOKENS_PER_ROW = float("inf")
        try:
            x = x.detach().requires_grad_(True)  # all models form the stack's input gradient
            return self.model(x).square().mean()
        finally:
            fp_dora.FUSED, fp_dora.TOKENS_PER_ROW = True, tokens_per_row

    def __call__(self, x) -> None:
        self.model.zero_grad(set_to_none=True)
        self.loss(x).backward()
        if self.opt is not None:
            self.opt.step()

    def grads(self, x) -> list[torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        self.loss(x).backward()
        return [p.grad for _, p in sorted(self.model.named_parameters()) if p.requires_grad]


def timed(clock: str, variants: dict, n_rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median ms per variant; variants alternate inside each round, order reversed every other round."""
    now = time.thread_time if clock == "cpu" else time.perf_counter
    labels, times = list(variants), {label: [] for label in variants}
    for i in range(warmup + n_rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            start = now()
            variants[label]()
            if i >= warmup:
                times[label].append((now() - start) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


# (outputs atol = rtol, gradients atol, rtol) of the check against HF PEFT: bf16 differs at its resolution
# (HF PEFT takes the weight norm in bf16, fastpeft in float32)
TOLERANCES = {torch.float32: (1e-5, 1e-6, 1e-4), torch.bfloat16: (3e-2, 1e-3, 1e-1)}


def run_shape(hidden: int, layers: int, r: int, token_counts: list[int], dtype_name: str, args) -> None:
    dtype = getattr(torch, dtype_name)
    trainers = {"peft": Trainer(build(peft, hidden, layers, r, dtype, args.dropout)),
                "fastpeft": Trainer(build(fastpeft, hidden, layers, r, dtype, args.dropout))}
    trainers["composed"] = Trainer(trainers["fastpeft"].model, fused=False)
    trainers["one-node"] = Trainer(trainers["fastpeft"].model, scaled=False)
    trainers["base"] = Trainer(frozen_base(hidden, layers).to(dtype))
    out_tol, grad_atol, grad_rtol = TOLERANCES[dtype]
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
        what = f"hidden {hidden}, {tokens} tokens"
        outs = []
        for name in ("fastpeft", "peft"):
            torch.manual_seed(3)  # the same dropout masks
            outs.append(trainers[name].model(x))
        check_close(*outs, f"{what}: outputs", atol=out_tol, rtol=out_tol)
        check_close(trainers["fastpeft"].grads(x), trainers["peft"].grads(x), f"{what}: gradients",
                    atol=grad_atol, rtol=grad_rtol)
        t = timed(args.clock, {k: (lambda tr=tr, x=x: tr(x)) for k, tr in trainers.items()}, rounds(args))
        print(f"{dtype_name:>8} | {hidden:>6} | {tokens:>6} | {t['peft']:>10.1f} | {t['fastpeft']:>11.1f} | "
              f"{t['one-node']:>8.1f} | {t['composed']:>11.1f} | {t['base']:>8.1f} | "
              f"{t['fastpeft'] / t['peft']:>13.2f} | {t['one-node'] / t['peft']:>14.2f} | "
              f"{t['composed'] / t['peft']:>13.2f} | {t['base'] / t['peft']:>9.2f}", flush=True)


def pieces(hidden: int, tokens: int, r: int, dtype_name: str, args) -> None:
    """Median ms of each op the one-GEMM form (variants/dora_scaled.py) adds to a layer's step, beside the two
    GEMMs of the floor, on one (tokens, hidden) layer; MB: the bytes each op must read or write at least."""
    from fastpeft.methods.lora.variants import dora_scaled as ds
    dtype, gen = getattr(torch, dtype_name), torch.Generator().manual_seed(5)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    x, g = rand(tokens, hidden), rand(tokens, hidden)
    w, a, b = rand(hidden, hidden, scale=0.03), rand(r, hidden, scale=0.03), rand(hidden, r, scale=0.03)
    m, s = (torch.rand(hidden, generator=gen) + 0.5).to(dtype), 2.0
    wk, k, _ = ds.scaled_weight(w, a, b, m, s)
    z, xa = x @ wk.T, x @ a.T
    bks, act = b * (k * s)[:, None], tokens * hidden * x.element_size() / 1e6
    gb, weight = g @ bks, hidden * hidden * x.element_size() / 1e6
    ops = {"floor: x W^T": (lambda: x @ w.T, 2 * act + weight),
           "floor: g W": (lambda: g @ w, 2 * act + weight),
           "Wk and n": (lambda: ds.scaled_weight(w, a, b, m, s), 2 * weight),
           "x A^T": (lambda: x @ a.T, act),
           "Wk again (backward)": (lambda: ds._rebuilt_weight(w, a, b, k, s), 2 * weight),
           "g^T (x A^T)": (lambda: g.T @ xa, act),
           "sum_t g z": (lambda: ds._column_dots(g, z, None), 2 * act),
           "g (s k B)": (lambda: g @ bks, act),
           "(g s k B)^T x": (lambda: gb.T @ x, act)}
    t = timed(args.clock, {label: fn for label, (fn, _) in ops.items()}, rounds(args), warmup=2)
    extra = sum(v for label, v in t.items() if not label.startswith("floor"))
    for label, (_, mb) in ops.items():
        print(f"{dtype_name:>8} | {hidden:>6} | {tokens:>6} | {label:<20} | {t[label]:>7.2f} | {mb:>5.0f}")
    print(f"{dtype_name:>8} | {hidden:>6} | {tokens:>6} | {'added, total':<20} | {extra:>7.2f} | "
          f"{sum(mb for label, (_, mb) in ops.items() if not label.startswith('floor')):>5.0f}", flush=True)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (rows of x)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (HF PEFT's DoRA then "
                        "evaluates x W^T again on the dropped input)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=None,
                        help="weights and input (bf16: AMX / AVX512-BF16 matmuls where the CPU has them); "
                             "default: float32 with --quick, both otherwise")
    parser.add_argument("--pieces", action="store_true", help="time the ops the one-GEMM form adds to one "
                        "layer's step instead (bf16 unless --dtype)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header(args)
    hiddens, token_counts = SHAPES["quick" if args.quick else "full"]
    layers = 2 if args.quick else args.layers
    if args.pieces:
        print(f"{'dtype':>8} | {'H':>6} | {'tokens':>6} | {'op (one layer)':<20} | {'ms':>7} | {'MB':>5}")
        for dtype_name in args.dtype or ["bfloat16"]:
            for hidden in args.hidden or hiddens:
                for tokens in args.tokens or token_counts:
                    pieces(hidden, tokens, args.r, dtype_name, args)
        return
    print(f"Linear stack: {layers} x nn.Linear(H, H) + tanh, DoRA r={args.r}, lora_dropout {args.dropout} on "
          f"every layer; one step = forward, mean-square loss, backward, AdamW step; {args.clock} clock, "
          "ms per step")
    print(f"{'dtype':>8} | {'H':>6} | {'tokens':>6} | {'HF PEFT':>10} | {'fastpeft':>11} | {'one-node':>8} | "
          f"{'fp composed':>11} | {'base':>8} | {'fastpeft / HF':>13} | {'one-node / HF':>14} | "
          f"{'composed / HF':>13} | {'base / HF':>9}")
    for dtype_name in args.dtype or (["float32"] if args.quick else ["float32", "bfloat16"]):
        for hidden in args.hidden or hiddens:
            run_shape(hidden, layers, args.r, args.tokens or token_counts, dtype_name, args)


if __name__ == "__main__":
    main()
