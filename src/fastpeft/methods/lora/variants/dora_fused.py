"""DoRA's linear output as one autograd node (training steps at hundreds of tokens and more).

With n = ||W + s B A||_row detached (Liu et al. 2024, section 4.3) and k = m / n (out,), the output y' after
the adapter, from the output so far y (x W^T + bias, plus earlier adapters' outputs, as HF PEFT), is

    y' = y + (k - 1) (y - bias) + k s B A x = k y + (1 - k) bias + (x A^T) (s k B)^T .

Written this way the forward is one elementwise pass over (tokens, out) plus a GEMM that accumulates the
rank-r product into it (`addmm_`), where the composed ops make seven passes (y - bias, two products, the LoRA
scaling, three sums), each with its own backward. The backward forms the (out, r) product g^T (x A^T) once and
uses it for both dB and the LoRA part of dk (s (g^T x A^T . B) summed over r): the magnitude's gradient needs
one (tokens, out) reduction, sum_t g (y - bias), and y's gradient is g k (one pass, no accumulation).
"""

from __future__ import annotations

import torch

from ..lean_dropout import dropout_scale, kept_value


class DoraLinearOutput(torch.autograd.Function):
    """y' from (x (..., in), y (..., out), A (r, in), B (out, r), m (out elements), n (out,), bias, s)."""

    @staticmethod
    def forward(ctx, x, y, a, b, m, norm, bias, s):
        k = m.reshape(-1) / norm  # (out,)
        out = y.shape[-1]
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, out)
        xa = x2 @ a.T  # (tokens, r)
        # in y's shape, not a view of a 2-D result: the caller may change the output in place
        z = y * k if bias is None else torch.addcmul(bias * (1 - k), y, k)
        z.view(-1, out).addmm_(xa, (b * (k * s)[:, None]).T)  # the rank-r product accumulated by the GEMM
        ctx.save_for_backward(x2, y2, a, b, k, norm, xa, bias)
        ctx.s, ctx.x_shape, ctx.m_shape = s, x.shape, m.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        x2, y2, a, b, k, norm, xa, bias = ctx.saved_tensors
        s, needs = ctx.s, ctx.needs_input_grad
        g = grad.reshape(-1, y2.shape[1])
        d_x = d_y = d_a = d_b = d_m = d_bias = None
        if needs[1]:
            d_y = (g * k).view(grad.shape)
        gxa = g.T @ xa  # (out, r): dB and the LoRA part of dk
        if needs[3]:
            d_b = gxa * (k * s)[:, None]
        g_sum = g.sum(0) if bias is not None and (needs[4] or needs[6]) else None
        if needs[4]:
            d_k = (g * y2).sum(0) + s * (gxa * b).sum(1)
            if bias is not None:
                d_k -= g_sum * bias
            d_m = (d_k / norm).view(ctx.m_shape)
        if needs[6]:
            d_bias = g_sum * (1 - k)
        if needs[0] or needs[2]:
            d_xa = g @ (b * (k * s)[:, None])  # (tokens, r)
            if needs[2]:
                d_a = d_xa.T @ x2
            if needs[0]:
                d_x = (d_xa @ a).view(ctx.x_shape)
        return d_x, d_y, d_a, d_b, d_m, None, d_bias, None


class DoraDropoutOutput(torch.autograd.Function):
    """With dropout acting (training): y' = y + (k - 1) (d W^T) + (d A^T)(s k B)^T for d = dropout(x), as HF
    PEFT (the correction term on the dropped input, a second GEMM with the frozen W).

    The mask is drawn as nn.Dropout draws it (lean_dropout.py: the same generator calls) and kept as one byte
    per element; d is not kept (rebuilt from x in backward); y's gradient is g itself (no pass).
    """

    @staticmethod
    def forward(ctx, x, y, w, a, b, m, norm, s, p):
        k = m.reshape(-1) / norm  # (out,)
        scale = dropout_scale(x, p)
        x2 = x.reshape(-1, x.shape[-1])
        d = (x * scale).reshape(x2.shape)  # what F.dropout(x) gives, bit for bit
        dw = d @ w.T  # (tokens, out)
        da = d @ a.T  # (tokens, r)
        z = torch.addcmul(y, dw.view(y.shape), k - 1)  # y's shape, not a view (see DoraLinearOutput)
        z.view(dw.shape).addmm_(da, (b * (k * s)[:, None]).T)
        ctx.save_for_backward(x2, scale.bool(), kept_value(scale, p), dw, da, w, a, b, k, norm)
        ctx.s, ctx.x_shape, ctx.m_shape = s, x.shape, m.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        x2, mask, kept, dw, da, w, a, b, k, norm = ctx.saved_tensors
        s, needs = ctx.s, ctx.needs_input_grad
        g = grad.reshape(dw.shape)
        d_x = d_a = d_b = d_m = None
        gda = g.T @ da  # (out, r)
        if needs[4]:
            d_b = gda * (k * s)[:, None]
        if needs[5]:
            d_m = (((g * dw).sum(0) + s * (gda * b).sum(1)) / norm).view(ctx.m_shape)
        if needs[0] or needs[3]:
            scale = torch.where(mask, kept.to(x2.dtype), 0.0).reshape(x2.shape)
            d_da = g @ (b * (k * s)[:, None])  # (tokens, r)
            if needs[3]:
                d_a = d_da.T @ (x2 * scale)
            if needs[0]:
                d_d = (g * (k - 1)) @ w  # (tokens, in)
                d_d.addmm_(d_da, a)
                d_x = (d_d * scale).view(ctx.x_shape)
        return d_x, grad, None, d_a, d_b, d_m, None, None, None


def fused_dropout_output(x, y, w, a, b, m, norm, s: float, p: float) -> torch.Tensor:
    """y' = y + DoRA's contribution on dropout(x), Linear adapter, frozen base weight w (out, in)."""
    return DoraDropoutOutput.apply(x, y, w, a, b, m, norm, s, p)


def fused_output(x, y, a, b, m, norm, bias, s: float) -> torch.Tensor:
    """y' = y + DoRA's contribution for a Linear adapter (see the module docstring); n detached."""
    return DoraLinearOutput.apply(x, y, a, b, m, norm, bias, s)
