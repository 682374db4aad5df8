"""DoRA's whole Linear layer as one GEMM with the rescaled weight (training steps at many tokens per row).

With n = ||W + s B A||_row detached (Liu et al. 2024, section 4.3) and k = m / n (out,), the adapted layer is

    y' = k (x W^T) + bias + k s (x A^T) B^T = x Wk^T + bias,   Wk = k (W + s B A)   (out, in).

Forming Wk costs a few passes over (out, in); in exchange the layer is one GEMM forward and one backward
(dx = g Wk), where the one-node form (dora_fused.py) keeps the base layer's GEMMs and adds (tokens, out)
passes: the rescaling `addcmul`, the rank-r product accumulated into the output, g k, the rank-r input
gradient and autograd's sum of it with the base layer's. Used from tokens >= TOKENS_PER_ROW * out (dora.py).

The magnitude's gradient needs sum_t g (x W^T): from the output itself, z - bias = k (x W^T + s (x A^T) B^T),
so sum_t g (z - bias) / m = (sum_t g x W^T + s rowsum(B . g^T x A^T)) / n, the magnitude's gradient, with no
(tokens, out) tensor kept beyond z. Where that division is not safe (a zero magnitude) or z was changed in
place after the forward, x W^T is formed again instead (one more GEMM).
"""

from __future__ import annotations

import torch

# rows of Wk formed at a time for a half-precision W: a 128 x 4096 float32 block (2 MiB) stays in cache
ROWS = 128


def scaled_weight(w, a, b, k, s: float) -> torch.Tensor:
    """Wk = k (W + s B A) (out, in) in w's dtype, summed in float32 at least and rounded once; for a
    half-precision W in row blocks through one reused float32 buffer (no full-size float32 temporaries)."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    bs, k = b.to(dtype) * s, k.to(dtype)[:, None]
    a = a.to(dtype)
    if w.dtype == dtype:
        return torch.addmm(w, bs, a).mul_(k)
    out = torch.empty_like(w)
    buf = torch.empty(min(ROWS, w.shape[0]), w.shape[1], dtype=dtype, device=w.device)
    for i in range(0, w.shape[0], ROWS):
        rows = buf[:min(ROWS, w.shape[0] - i)]
        rows.copy_(w[i:i + ROWS])
        rows.addmm_(bs[i:i + ROWS], a).mul_(k[i:i + ROWS])
        out[i:i + ROWS].copy_(rows)
    return out


class DoraScaledOutput(torch.autograd.Function):
    """y' (..., out) from (x (..., in), W (out, in) frozen, bias, A (r, in), B (out, r), m, n (out,), s)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, m, norm, s):
        k = m.reshape(-1) / norm  # (out,)
        wk = scaled_weight(w, a, b, k, s)
        x2 = x.reshape(-1, x.shape[-1])
        # written into a tensor of the output's shape, not returned as a view of a 2-D result: the caller may
        # change it in place (then see backward)
        z = x2.new_empty(*x.shape[:-1], wk.shape[0])
        if bias is None:
            torch.mm(x2, wk.T, out=z.view(-1, wk.shape[0]))
        else:
            torch.addmm(bias, x2, wk.T, out=z.view(-1, wk.shape[0]))
        xa = x2 @ a.T  # (tokens, r): for dB and dA
        ctx.save_for_backward(x2, w, wk, a, b, m, k, norm, xa, bias)
        # detached: shares z's storage and version counter without a reference back to this node
        ctx.z, ctx.z_version = z.detach().view(-1, z.shape[-1]), z._version
        ctx.s, ctx.x_shape = s, x.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        x2, w, wk, a, b, m, k, norm, xa, bias = ctx.saved_tensors
        s, needs = ctx.s, ctx.needs_input_grad
        g = grad.reshape(-1, wk.shape[0])
        d_x = d_bias = d_a = d_b = d_m = None
        if needs[0]:
            d_x = (g @ wk).view(ctx.x_shape)
        gxa = g.T @ xa  # (out, r)
        ks = (k * s)[:, None]
        if needs[4]:
            d_b = gxa * ks
        g_sum = g.sum(0) if bias is not None and (needs[2] or needs[5]) else None
        if needs[5]:
            d_m = _magnitude_grad(ctx, g, g_sum, x2, w, b, m, norm, bias, gxa).view(m.shape)
        if needs[2]:
            d_bias = g_sum
        if needs[3]:
            d_a = (g @ (b * ks)).T @ x2  # (r, in)
        ctx.z = None
        return d_x, None, d_bias, d_a, d_b, d_m, None, None


def _magnitude_grad(ctx, g, g_sum, x2, w, b, m, norm, bias, gxa):
    """dL/dm (out,): sum_t g (z - bias) / m from the kept output, else from x W^T formed again."""
    m = m.reshape(-1)
    z = ctx.z
    if z._version == ctx.z_version and bool((m != 0).all()):
        d = (g * z).sum(0)
        if bias is not None:
            d -= g_sum * bias
        return d / m
    return ((g * (x2 @ w.T)).sum(0) + ctx.s * (gxa * b).sum(1)) / norm


def scaled_output(x, w, bias, a, b, m, norm, s: float) -> torch.Tensor:
    """The DoRA Linear layer's output x Wk^T + bias (see the module docstring); n detached."""
    return DoraScaledOutput.apply(x, w, bias, a, b, m, norm, s)
