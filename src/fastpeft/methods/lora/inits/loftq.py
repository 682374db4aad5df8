"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
Models", https://arxiv.org/abs/2310.08659), as HF PEFT 0.21's `init_lora_weights='loftq'`.

For a target weight W and rank r, LoftQ alternates (loftq_iter rounds, Algorithm 1 of the paper):

    Q      = dequant(quant(W - B A))          (B A = 0 in the first round)
    B, A   = best rank-r fit of W - Q         (truncated SVD, sqrt of the singular values on each side)

and leaves Q in the base layer, so base + B A approximates W better than Q alone. As in HF PEFT, B A is set to
W - Q itself, not divided by the LoRA scaling, so the fit holds for lora_alpha == r.

The quantisers reproduce what HF PEFT gets from bitsandbytes, in plain PyTorch (no bitsandbytes, any device):
  * 4 bits: NF4 (Dettmers et al. 2023, "QLoRA", appendix E): the weight, flattened row-major, is cut into
    blocks of 64; each block is divided by its absolute maximum and every entry goes to the nearest of the 16
    NF4 levels (ties towards the lower level); dequantisation multiplies the level back by the block's absmax
    (float32).
  * 8 bits: LLM.int8()'s vector-wise int8 (Dettmers et al. 2022): the weight is cast to float16, each row is
    scaled by 127 / its absmax and rounded half-to-even; dequantisation multiplies by absmax / 127.
tests/methods/test_loftq_bnb.py checks both bit for bit against bitsandbytes 0.50.2 (and LoftQ against HF
PEFT's on real bitsandbytes). They stay in PyTorch rather than calling bitsandbytes: its CPU kernel
dequantises 2-D 4-bit tensors row by row, which differs from its own (flat) quantisation when a row is not a
multiple of 64 long, while NF4 as defined (as bitsandbytes computes it on a flattened weight) is what these
functions return (not checked on GPU). The quantisers see the weight in its stored layout (as HF PEFT hands it
to bitsandbytes); for GPT-2's Conv1D, which stores (in, out), the factors are transposed into LoRA's (r, in) /
(out, r) shapes.
"""

from __future__ import annotations

import torch

from ....quant.bnb import bnb_kind
from .common import base_weight, check_decomposable, is_transposed, set_factors

NF4_BLOCK = 64
# The 16 NF4 levels: normalised quantiles of N(0, 1), 8 on the positive side, 7 on the negative side, and an
# exact 0 (QLoRA, appendix E; the float32 values bitsandbytes uses).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
INT8_MAX = 127


def _safe_ratio(top: float, x: torch.Tensor) -> torch.Tensor:
    """top / x, with 0 where x == 0 (an all-zero block or row dequantises to zeros)."""
    return torch.where(x > 0, top / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant_NF4(weight)) in float32, same shape; blocks of 64 consecutive entries (the last may be
    short, padded with zeros, which do not change its absmax)."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    count = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -count % NF4_BLOCK)).view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=flat.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    normed = (blocks * _safe_ratio(1.0, absmax)).clamp(-1.0, 1.0)
    codes = torch.bucketize(normed, midpoints)  # number of midpoints strictly below: nearest level
    return (levels[codes] * absmax).reshape(-1)[:count].view(weight.shape)


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant_int8(weight)) in float32 for a 2-D weight: float16 first, then one absmax per row."""
    half = weight.detach().to(torch.float16).to(torch.float32)  # float16 -> float32 is exact
    absmax = half.abs().amax(dim=1, keepdim=True)
    codes = torch.round(half * _safe_ratio(float(INT8_MAX), absmax)).to(torch.int8)
    return codes.to(torch.float32) * absmax * (1.0 / INT8_MAX)


QUANTISERS = {4: nf4_roundtrip, 8: int8_roundtrip}


def rank_r_fit(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with left @ right the best rank-`rank` approximation of `residual` (Eckart-Young):
    left = U_r sqrt(S_r), right = sqrt(S_r) V_r^T."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, bits: int, rank: int, rounds: int = 1):
    """LoftQ on a 2-D weight (any layout): (Q, left, right) in float32 with Q + left @ right ~ weight.

    Q is the dequantised `bits`-bit quantisation of weight - left @ right from the previous round (of weight
    itself in the first); left @ right is the rank-`rank` fit of weight - Q.
    """
    if bits not in QUANTISERS:
        raise ValueError(
            f"LoftQ supports loftq_bits in {sorted(QUANTISERS)} (4: NF4, 8: int8), got {bits!r}.")
    if rounds < 1:
        raise ValueError(f"LoftQ needs loftq_iter >= 1, got {rounds!r}.")
    target = weight.detach().to(torch.float32)
    approx = target
    for _ in range(rounds):
        quantised = QUANTISERS[bits](approx)
        left, right = rank_r_fit(target - quantised, rank)
        approx = target - left @ right
    return quantised, left, right


def _refuse_quantised_base(base) -> None:
    kind = bnb_kind(base)
    if kind is not None:
        raise TypeError(
            f"init_lora_weights='loftq' quantises the float weights itself, but this base layer is already a "
            f"bitsandbytes {kind} {type(base).__name__}. For a 4-bit model, create the adapter with "
            "init_lora_weights=True and call replace_lora_weights_loftq(peft_model); otherwise start from "
            "the unquantised model."
        )


def loftq_init(layer, name: str, config) -> None:
    """init_lora_weights='loftq': the base weight becomes Q, and B A the rank-r fit of W - Q (see module
    doc)."""
    _refuse_quantised_base(layer.get_base_layer())
    weight = base_weight(layer, "loftq")
    check_decomposable(layer, name, weight, "loftq")
    settings = config.loftq_config
    quantised, left, right = loftq_decompose(weight, settings["loftq_bits"], layer.r[name],
                                             settings["loftq_iter"])
    # stored (in, out): W^T - Q^T = R^T L^T
    b, a = (right.T, left.T) if is_transposed(layer) else (left, right)
    set_factors(layer, name, a, b, weight.dtype)
    layer.get_base_layer().weight.data = quantised.to(weight.dtype)

