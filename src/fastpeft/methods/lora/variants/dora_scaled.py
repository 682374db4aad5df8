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

# rows of half-precision g, z multiplied at a time in backward: a 256 x 4096 bf16 block (2 MiB) stays in cache
DOT_ROWS = 256


def scaled_weight(w, a, b, m, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wk, k, n): V = W + s B A in w's dtype (one GEMM that adds into W: summed in float32, rounded once),
    n = ||V||_row accumulated in float32 at least (from V itself: no cancellation to guard against, unlike the
    factored norm dora.row_norm forms without V) and rounded to m's dtype as the composed ops round it,
    k = m / n, Wk = k V. For half-precision weights Wk is rounded twice (V, then k V): about one unit in
    the last place, where widening W to float32 and back (per row block) cost ~1 ms more per (1024, 1024)
    weight on CPU than the whole rest of the formation."""
    v = torch.addmm(w, b, a, alpha=s)
    # in v's dtype: the reduction accumulates half precision in float32 and rounds the norm once (asking for
    # a float32 result instead widens every element first: 7x slower for a bf16 (1024, 1024) V on CPU)
    norm = torch.linalg.vector_norm(v, dim=1).to(m.dtype)
    m = m.reshape(-1)
    k = m / norm
    return _rescaled(v, k), k, norm


def _rescaled(v, k):
    return v.mul_(k.to(v.dtype)[:, None])


def _rebuilt_weight(w, a, b, k, s: float) -> torch.Tensor:
    """Wk again in backward, by the forward's ops on the same tensors (bit-identical): keeping it from the
    forward would hold one weight-sized tensor per layer until backward, which HF PEFT's DoRA does not."""
    return _rescaled(torch.addmm(w, b, a, alpha=s), k)


class DoraScaledOutput(torch.autograd.Function):
    """y' (..., out) from (x (..., in), W (out, in) frozen, bias, A (r, in), B (out, r), m (out elements), s);
    n = ||W + s B A||_row is formed with Wk (and detached: no gradient flows through it)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, m, s):
        wk, k, norm = scaled_weight(w, a, b, m, s)
        x2 = x.reshape(-1, x.shape[-1])
        # written into a tensor of the output's shape, not returned as a view of a 2-D result: the caller may
        # change it in place (then see backward)
        z = x2.new_empty(*x.shape[:-1], wk.shape[0])
        if bias is None:
            torch.mm(x2, wk.T, out=z.view(-1, wk.shape[0]))
        else:
            torch.addmm(bias, x2, wk.T, out=z.view(-1, wk.shape[0]))
        xa = x2 @ a.T  # (tokens, r): for dB and dA
        ctx.save_for_backward(x2, w, a, b, m, k, norm, xa, bias)
        # detached: shares z's storage and version counter without a reference back to this node
        ctx.z, ctx.z_version = z.detach().view(-1, z.shape[-1]), z._version
        ctx.s, ctx.x_shape = s, x.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, m, k, norm, xa, bias = ctx.saved_tensors
        s, needs = ctx.s, ctx.needs_input_grad
        g = grad.reshape(-1, w.shape[0])
        d_x = d_bias = d_a = d_b = d_m = None
        if needs[0]:
            d_x = (g @ _rebuilt_weight(w, a, b, k, s)).view(ctx.x_shape)
        gxa = g.T @ xa  # (out, r)
        ks = (k * s)[:, None]
        if needs[4]:
            d_b = gxa * ks
        if needs[5]:
            d_m = _magnitude_grad(ctx, g, x2, w, b, m, norm, bias, gxa).view(m.shape)
        if needs[2]:
            d_bias = g.sum(0)
        if needs[3]:
            d_a = (g @ (b * ks)).T @ x2  # (r, in)
        ctx.z = None
        return d_x, None, d_bias, d_a, d_b, d_m, None


def _magnitude_grad(ctx, g, x2, w, b, m, norm, bias, gxa):
    """dL/dm (out,): sum_t g (z - bias) / m from the kept output, else from x W^T formed again."""
    m = m.reshape(-1)
    z = ctx.z
    if z._version == ctx.z_version and bool((m != 0).all()):
        return (_column_dots(g, z, bias) / m).to(m.dtype)
    return ((g * (x2 @ w.T)).sum(0) + ctx.s * (gxa * b).sum(1)) / norm


def _column_dots(g, z, bias) -> torch.Tensor:
    """sum_t g (z - bias) (out,) as float32; for half precision from blocks of DOT_ROWS rows through one
    reused buffer (no (tokens, out) product): the products rounded as `g * z` rounds them, each block's sum
    accumulated in float32 and rounded once, the blocks summed in float32; the bias term as bias sum_t g."""
    if g.dtype == torch.promote_types(g.dtype, torch.float32):
        return (g * z).sum(0) if bias is None else (g * (z - bias)).sum(0)
    acc = torch.zeros(g.shape[1], dtype=torch.float32, device=g.device)
    g_sum = None if bias is None else torch.zeros_like(acc)
    buf = torch.empty(min(DOT_ROWS, g.shape[0]), g.shape[1], dtype=g.dtype, device=g.device)
    for i in range(0, g.shape[0], DOT_ROWS):
        rows, g_rows = buf[:min(DOT_ROWS, g.shape[0] - i)], g[i:i + DOT_ROWS]
        acc += torch.mul(z[i:i + DOT_ROWS], g_rows, out=rows).sum(0)
        if g_sum is not None:
            g_sum += g_rows.sum(0)
    return acc if bias is None else acc - g_sum * bias


def scaled_output(x, w, bias, a, b, m, s: float) -> torch.Tensor:
    """The DoRA Linear layer's output x Wk^T + bias (see the module docstring); n detached."""
    return DoraScaledOutput.apply(x, w, bias, a, b, m, s)
