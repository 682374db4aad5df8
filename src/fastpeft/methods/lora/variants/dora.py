"""DoRA, `use_dora=True`: a learnt per-output magnitude apart from the LoRA direction.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5 and section 4.3. One class per layer
kind (linear, embedding, convolution); the bitsandbytes one is in dora_bnb.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .base import LoraVariant
from .dora_fused import fused_dropout_output, fused_output
from .dora_scaled import scaled_output

# Rows whose squared norm lost more than this fraction to cancellation are recomputed directly (see row_norm).
CANCELLATION = 1e-2
# Linear layers not dropping out: output plus contribution as one autograd node (dora_fused.py). False: the
# composed ops (equal up to rounding; the reference the fused node is tested against)
FUSED = True
# The whole layer as one GEMM with k (W + s B A) (dora_scaled.py) from this many rows (tokens) per output
# feature on: forming that (out, in) weight costs about what the one-node form's (tokens, out) passes save
# at tokens ~ out / 2 (bf16, H 1024-2048, 1 CPU thread)
TOKENS_PER_ROW = 0.5


def row_norm(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float,
             w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W_o + s (B A)_o||_2 for every row o, in the factored form; w (out, n), b (out, r), a (r, n)
    -> (out,).

    ||W_o + s B_o A||^2 = ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T, so only (out, r) and (r, r)
    products are formed, never an (out, n) one. `w_sq` is ||W_o||^2 (cached by the caller for a frozen W).
    Computed in float32 at least; rows where cancellation ate the precision are recomputed directly.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    a = a.to(dtype)
    b = b.to(dtype)
    compiling = torch.compiler.is_compiling()
    if w_sq is None or compiling:
        w = w.to(dtype)  # a no-op for float32 weights
    wa = w @ a.T if w.dtype == dtype else _widened_product(w, a.T)  # (out, r)
    if w_sq is None:
        w_sq = w.square().sum(1)  # (out,)
    lora_sq = ((b @ (a @ a.T)) * b).sum(1) * (s * s)  # (out,)
    sq = w_sq + 2 * s * (b * wa).sum(1) + lora_sq
    # W_o and s (BA)_o nearly cancel: fp error is no longer relative
    bad = sq < CANCELLATION * (w_sq + lora_sq)
    if compiling:  # no data-dependent Python branch in a graph: torch.cond instead
        sq = torch.cond(bad.any(), _exact_where, _unchanged, (sq, bad, w, b, a, torch.tensor(s, dtype=dtype)))
    elif bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        exact = (w[rows].to(dtype) + s * (b[rows] @ a)).square().sum(1)
        sq = sq.index_put((rows,), exact)
    return sq.clamp_min(0).sqrt()


# rows of a half-precision weight widened at a time by _widened_product: 128 x 4096 float32 is 2 MiB
WIDEN_ROWS = 128


def _widened_product(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w @ m in m's (wider) dtype for a half-precision w (out, n), without a widened copy of all of w: row
    blocks are widened into one reused buffer. The same values as w.to(m.dtype) @ m (widening is exact), at
    a fraction of the memory traffic (a bf16 (2048, 2048) weight: 16 MiB float32 copy per step otherwise)."""
    out = torch.empty(w.shape[0], m.shape[1], dtype=m.dtype, device=m.device)
    buf = torch.empty(min(WIDEN_ROWS, w.shape[0]), w.shape[1], dtype=m.dtype, device=m.device)
    for i in range(0, w.shape[0], WIDEN_ROWS):
        block = w[i:i + WIDEN_ROWS]
        rows = buf[:block.shape[0]]
        rows.copy_(block)
        torch.mm(rows, m, out=out[i:i + WIDEN_ROWS])
    return out


def _exact_where(sq, bad, w, b, a, s):
    """`sq` with the rows in `bad` replaced by ||W_o + s (B A)_o||^2 computed directly (all rows: no
    gather)."""
    return torch.where(bad, (w + s * (b @ a)).square().sum(1), sq)


def _unchanged(sq, bad, w, b, a, s):
    return sq.clone()


class Dora(LoraVariant):
    """DoRA on a linear layer (incl. Conv1D): W' = m (W + s B A) / ||W + s B A||_row (Liu et al. 2024, eq. 5).

    Output: base(x) + (m / n - 1) * (x W^T) + (m / n) * s B A x, with n = ||W + s B A||_row treated as a
    constant (detached, section 4.3). m, n: (out,). The hooks below give each layer kind's geometry.
    """

    # -------- geometry of the base layer (overridden for embeddings and convolutions)
    def factors(self, layer, name: str, weight: torch.Tensor):
        """(W (out, n), B (out, r), A (r, n)) with the norm taken over n, from `weight` in stored layout."""
        a, b = layer.lora_weights(name)
        return (weight.T if layer.fan_in_fan_out else weight), b, a

    def channel_view(self, layer, out: int) -> tuple[int, ...]:
        """Shape that broadcasts an (out,) vector over the layer's output: the feature dim is last."""
        return (out,)

    def weight_view(self, layer, out: int) -> tuple[int, ...]:
        """Shape that broadcasts an (out,) vector over the base weight in stored layout."""
        return (1, out) if layer.fan_in_fan_out else (out, 1)

    def base_without_bias(self, layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """x W^T from the output so far (HF PEFT's choice, also with several adapters): result - bias."""
        bias = layer.get_base_layer().bias
        return result if bias is None else result - bias.view(self.channel_view(layer, -1))

    # -------- the weight norm n = ||W + s B A||_row, detached (section 4.3)
    @torch.no_grad()
    def weight_norm(self, layer, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """n (out,) against the live base weight (its ||W_o||^2 cached) or a given one (merging)."""
        param = layer.get_base_layer().weight
        w, b, a = self.factors(layer, name, (param if weight is None else weight).detach())
        w_sq = _cached_row_sq(layer, param, w) if weight is None else None
        return row_norm(w, b, a, layer.scaling[name], w_sq)

    def magnitude_scale(self, layer, name: str) -> torch.Tensor:
        """m / n, (out,): grads reach m only."""
        m = magnitude(layer, name)
        return m.flatten() / self.weight_norm(layer, name).to(m.dtype)

    # -------- hooks
    def init(self, layer, name):
        # low_cpu_mem_usage: m comes from the file, only its size here
        if layer.lora_weights(name)[0].is_meta:
            rows = self.factors(layer, name, layer.get_base_layer().weight)[0].shape[0]
            norm = torch.empty(rows, dtype=torch.float32, device="meta")
        else:
            with torch.no_grad():
                norm = self.weight_norm(layer, name)  # m starts at ||W + s B A||_row: identity at init
        shape = self.magnitude_shape(layer, norm.shape[0])
        holder = nn.Module()  # m as `lora_magnitude_vector.<adapter>.weight`, HF PEFT's parameter name
        holder.weight = nn.Parameter(norm.reshape(shape).to(layer.lora_weights(name)[0].dtype))
        layer.lora_magnitude_vector[name] = holder

    def magnitude_shape(self, layer, out: int) -> tuple[int, ...]:
        return (out,)

    def contribution(self, layer, name, x, result):
        x = layer.cast_input(x, layer.lora_weights(name)[0].dtype)
        scale = self.magnitude_scale(layer, name).view(self.channel_view(layer, -1))  # (out,) broadcast
        dropout = layer.lora_dropout[name]
        if result is None or (layer.training and not isinstance(dropout, nn.Identity)):
            x = dropout(x)
            base = layer.base_path(x)  # x W^T on the dropped-out input (no bias)
        else:
            base = self.base_without_bias(layer, x, result)
        return (scale - 1) * base + scale * layer.lora_path(name, x)

    def add_to(self, layer, name, x, result):
        dropout = self._fusable(layer, name, result)
        x_cast = None if dropout is False else layer.cast_input(x, result.dtype)
        if x_cast is None or x_cast.dtype != result.dtype:  # or: input casting is switched off
            return result + self.contribution(layer, name, x, result)
        x, m = x_cast, magnitude(layer, name)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        norm = self.weight_norm(layer, name).to(m.dtype)
        base = layer.get_base_layer()
        if dropout is None:
            return fused_output(x, result, a, b, m, norm, base.bias, layer.scaling[name])
        return fused_dropout_output(x, result, base.weight, a, b, m, norm, layer.scaling[name], dropout.p)

    def layer_output(self, layer, name, x):
        if not _scaled_applies(self, layer, name, x):
            return None
        base = layer.get_base_layer()
        return scaled_output(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             magnitude(layer, name), layer.scaling[name])

    def _fusable(self, layer, name, result):
        """Whether a one-node form (dora_fused.py) applies: False, or the dropout module acting (None when
        none acts). A Linear layer (features last), plain Linear factors without lora_bias, one dtype
        throughout (mixed dtypes keep HF PEFT's order of roundings), not while compiling; with dropout also a
        plain nn.Linear base with a frozen weight and an nn.Dropout."""
        if not FUSED or torch.compiler.is_compiling() or type(self).contribution is not Dora.contribution:
            return False
        if self.channel_view(layer, -1) != (-1,):
            return False
        dropout = layer.lora_dropout[name]
        dropout = None if not layer.training or isinstance(dropout, nn.Identity) else dropout
        if dropout is not None and not _dropout_fusable(self, layer, dropout, result):
            return False
        if not _plain_factors(layer, name):
            return False
        a_mod, b_mod = layer.lora_A[name], layer.lora_B[name]
        bias = layer.get_base_layer().bias
        tensors = (a_mod.weight, b_mod.weight, magnitude(layer, name))
        if any(t.dtype != result.dtype for t in tensors) or (bias is not None and bias.dtype != result.dtype):
            return False
        return dropout

    def merged_weight(self, layer, name):
        delta = layer.delta_weight(name)  # s B A in stored layout
        with unmerged_base_weight(layer) as original:
            norm = self.weight_norm(layer, name, original)  # against the weight forward sees (no merges)
        layer._variant_cache[f"{name}-weight-norm"] = norm
        factor = self._factor(layer, name, norm)
        weight = layer.get_base_layer().weight.data
        # the sum is taken in the adapter's (wider) dtype and rounded once, as HF PEFT: rounding the delta to
        # a half-precision base first loses 1.3-2x more of the base weight over a merge / unmerge round trip
        return (factor * (weight + delta)).to(weight.dtype)

    def unmerged_weight(self, layer, name):
        norm = layer._variant_cache.pop(f"{name}-weight-norm")
        weight = layer.get_base_layer().weight.data
        factor = self._factor(layer, name, norm)
        return (weight / factor - layer.delta_weight(name)).to(weight.dtype)

    def _factor(self, layer, name, norm):
        m = magnitude(layer, name).detach().flatten()
        return (m / norm.to(m.dtype)).view(self.weight_view(layer, -1))


class DoraEmbedding(Dora):
    """DoRA on an embedding table W (vocab, dim): the norm is per embedding dimension, over the vocabulary
    (HF PEFT's layout), so W^T (dim, vocab) plays the linear weight; m, n: (dim,)."""

    def factors(self, layer, name, weight):
        a, b = layer.lora_weights(name)  # A (r, vocab), B (dim, r)
        return weight.T, b, a

    def weight_view(self, layer, out):
        return (1, out)

    def contribution(self, layer, name, x, result):
        scale = self.magnitude_scale(layer, name)  # (dim,)
        base = layer.base_path(x) if result is None else result  # no dropout on embeddings (as HF PEFT)
        return (scale - 1) * base + scale * layer.lora_path(name, x)


class DoraConv(Dora):
    """DoRA on Conv1d/2d/3d: W (out, in/groups, k...) flattened to (out, n); m has shape (1, out, 1, ...)."""

    def factors(self, layer, name, weight):
        a, b = layer.lora_weights(name)  # A (r, in, k...), B (out, r, 1...)
        return weight.flatten(1), b.flatten(1), a.flatten(1)

    @torch.no_grad()
    def weight_norm(self, layer, name, weight=None):
        if layer.get_base_layer().groups == 1:
            return super().weight_norm(layer, name, weight)
        # grouped: HF PEFT views B (out, r/groups) as (out/groups, r) and reshapes B A to W's shape; computed
        # directly, as that product has no row-wise factored form
        weight = (layer.get_base_layer().weight if weight is None else weight).detach()
        a, b = layer.lora_weights(name)
        r, dtype = a.shape[0], torch.promote_types(a.dtype, torch.float32)
        delta = (b.reshape(-1, r).to(dtype) @ a.reshape(r, -1).to(dtype)).reshape(weight.shape)
        return (weight.to(dtype) + layer.scaling[name] * delta).flatten(1).norm(dim=1)  # (out,)

    def channel_view(self, layer, out):
        return (1, out) + (1,) * (layer.get_base_layer().weight.dim() - 2)

    def weight_view(self, layer, out):
        return (out,) + (1,) * (layer.get_base_layer().weight.dim() - 1)

    def magnitude_shape(self, layer, out):
        return self.channel_view(layer, out)


def _scaled_applies(variant, layer, name, x) -> bool:
    """The one-GEMM form (dora_scaled.py): enough rows, a plain DoRA Linear on a dense nn.Linear (no hooks,
    weight frozen) with plain Linear factors, no lora_bias, no dropout acting, one dtype
    throughout, not under autocast, not while compiling; on the CPU only (its backward reads whether any
    magnitude is zero: free on the CPU, a host sync per layer and step on an accelerator, where it is also
    unmeasured); not in float16, whose range lets the products g z of the magnitude's gradient underflow
    (relative error 0.09 against float64 where the other forms keep 0.008: tests/integrations/test_gpu.py)."""
    if not FUSED or type(variant) is not Dora or torch.compiler.is_compiling() or x.dim() < 2:
        return False
    if x.device.type != "cpu" or x.dtype == torch.float16:
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast picks each op's dtype: HF PEFT's ops, not Wk's
        return False
    base = layer.get_base_layer()
    # (an nn.Linear base is never fan_in_fan_out: model.py turns it off)
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    if x.numel() < TOKENS_PER_ROW * base.out_features * x.shape[-1] or base.weight.requires_grad:
        return False
    layer_type = type(layer)  # the plain LoRA Linear's base output (x W^T + bias from base_layer(x))
    if (layer_type.base_path.__qualname__ != "Linear.base_path"
            or layer_type.base_forward.__qualname__ != "AdapterLayer.base_forward"):
        return False
    dropout = layer.lora_dropout[name]
    if layer.training and not isinstance(dropout, nn.Identity):
        return False
    if not _plain_factors(layer, name):
        return False
    a_mod, b_mod = layer.lora_A[name], layer.lora_B[name]
    tensors = (base.weight, a_mod.weight, b_mod.weight, magnitude(layer, name), base.bias)
    return all(t is None or t.dtype == x.dtype for t in tensors)


def _plain_factors(layer, name) -> bool:
    """A and B are plain nn.Linear modules and B has no bias (no lora_bias): what the one-node and one-GEMM
    forms read directly."""
    a_mod, b_mod = layer.lora_A[name], layer.lora_B[name]
    return type(a_mod) is nn.Linear and type(b_mod) is nn.Linear and b_mod.bias is None


def _dropout_fusable(variant, layer, dropout, result) -> bool:
    """The dropout node computes d W^T itself: only for a dense nn.Linear base whose weight does not train,
    read through the plain LoRA Linear's base_path, and nn.Dropout's own law."""
    base = layer.get_base_layer()
    if type(variant) is not Dora or type(base) is not nn.Linear or type(dropout) is not nn.Dropout:
        return False
    if type(layer).base_path.__qualname__ != "Linear.base_path" or layer.fan_in_fan_out:
        return False
    return (not base.weight.requires_grad and base.weight.dtype == result.dtype and 0 < dropout.p < 1
            and not dropout.inplace)


def _cached_row_sq(layer, param: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||W_o||^2 (out,) in float32 of `w`, the rows of the frozen base weight `param`, recomputed when `param`
    changes: merge / unmerge clear the cache, other in-place writes bump the version counter, new tensors move
    the pointer. (Writes through `param.data` in place are invisible: call `layer._variant_cache.clear()`.)"""
    if torch.compiler.is_compiling():  # data pointers do not trace: compute it in the graph (no cache)
        return w.to(torch.promote_types(w.dtype, torch.float32)).square().sum(1)
    key = (param.data_ptr(), param._version, param.shape, param.dtype, param.device)
    cache = layer._variant_cache
    if cache.get("row-sq-key") != key:
        cache["row-sq"] = w.to(torch.promote_types(w.dtype, torch.float32)).square().sum(1)
        cache["row-sq-key"] = key
    return cache["row-sq"]


@contextmanager
def unmerged_base_weight(layer):
    """The base weight with every merged adapter of `layer` taken out (they are merged back on exit).

    Merging re-enters this for DoRA adapters merged back; they reuse the outer weight (no repeated unmerging).
    """
    cache = layer._variant_cache
    if "unmerged" in cache:
        yield cache["unmerged"]
        return
    merged = list(layer.merged_adapters)
    if not merged:
        yield layer.get_base_layer().weight.data  # not modified in place by the callers
        return
    try:
        layer.unmerge()
        cache["unmerged"] = layer.get_base_layer().weight.data.clone()
        yield cache["unmerged"]
    finally:
        try:
            layer.merge(adapter_names=[n for n in merged if n not in layer.merged_adapters])
        finally:
            cache.pop("unmerged", None)


def magnitude(layer, name: str) -> nn.Parameter:
    """DoRA's m of adapter `name` on `layer`."""
    return layer.lora_magnitude_vector[name].weight
