"""LoRA layers: `y = base(x) + (alpha / r) * B(A(dropout(x)))` (Hu et al., 2021, eq. 3).

One subclass per kind of base layer: linear (incl. GPT-2 `Conv1D`), embedding, Conv1d/2d/3d and
`nn.MultiheadAttention`. Parameter names match HF PEFT (`lora_A`, `lora_B`, `lora_embedding_A/B`,
`lora_magnitude_vector`). Variants such as DoRA plug in per adapter through `variants/`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from . import gathered, inplace
from .config import lora_scaling
from .inits.schemes import INIT_SCHEMES
from .lean_dropout import lean_applies, lean_lora_output
from .variants import table as variant_table
from .variants.base import LoraVariant

logger = logging.getLogger(__name__)


class LoraLayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                           "lora_magnitude_vector")
    # HF PEFT's name for them (diffusers' layerwise casting skips these)
    adapter_layer_names = adapter_param_names
    file_bare_entries = ("lora_magnitude_vector",)  # DoRA's m: `...lora_magnitude_vector` in files
    input_cast_switchable = True  # every input cast goes through cast_input (variants' included)
    is_embedding = False
    variant_kind = "linear"  # layer kind in the rows of variants/table.py VARIANTS
    factors_attr = "lora_A"  # the dict that holds every adapter of this layer: forward's ownership test

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                 fan_in_fan_out: bool = False, **kwargs) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's m per adapter, as `.weight` (variants/dora.py)
        self.lora_variant: dict[str, LoraVariant] = {}  # adapters with a variant; plain LoRA: absent
        self._variant_cache: dict = {}  # variants' derived tensors (never saved)
        # base weight stored (in, out) (Conv1D); set before variants init
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = self.feature_sizes(self.get_base_layer())
        self.update_layer(adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        self._active_adapters = [adapter_name]

    def feature_sizes(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def build(self, name: str, r: int, lora_bias: bool) -> None:
        """Create the A and B factors of adapter `name`."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config, r: int, lora_alpha: float, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r} for adapter '{adapter_name}'.")
        variant = variant_table.choose(self.variant_kind, config)
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            logger.warning("lora_bias=True on a layer without bias: merging will not be possible.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = self.initial_scaling(adapter_name)
        self.lora_dropout[adapter_name] = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                           else nn.Identity())
        self.build(adapter_name, r, config.lora_bias)
        INIT_SCHEMES.run(self, adapter_name, config)
        self.lora_variant.pop(adapter_name, None)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if variant is not None:
            self.lora_variant[adapter_name] = variant
            # module key (BD-LoRA)
            self.target_name = kwargs.get("target_name", getattr(self, "target_name", ""))
            variant.init(self, adapter_name)

    def initial_scaling(self, name: str) -> float:
        return lora_scaling(self.lora_alpha[name], self.r[name], self.use_rslora[name])

    def lora_weights(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def lora_B_bias(self, name: str) -> nn.Parameter | None:
        return self.lora_B[name].bias if name in self.lora_B else None

    def delta_bias(self, name: str) -> torch.Tensor | None:
        bias = self.lora_B_bias(name)
        if bias is None:
            return None
        if self.get_base_layer().bias is None:
            raise ValueError(f"Cannot merge adapter '{name}': lora_bias=True but the base layer has no bias.")
        return bias * self.scaling[name]

    # ------------------------------------------------------------------ outputs (variants hook in here)
    def lora_path(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s * B A x for an input already through dropout."""
        raise NotImplementedError

    def base_path(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output without its bias (used by variants)."""
        raise NotImplementedError

    def adapter_output(self, name, x, *args, **kwargs):
        variant = self.lora_variant.get(name)
        if variant is not None:  # alone, e.g. in mixed batches: against the base output
            return variant.contribution(self, name, x, None)
        x = self.cast_input(x, self.lora_weights(name)[0].dtype)  # before dropout, as HF PEFT
        return self.lora_path(name, self.lora_dropout[name](x))

    def add_adapters(self, result, x, names, *args, **kwargs):
        # per call only live lookups (as HF PEFT's `lora_A.keys()`): no set over all adapter dicts, and no
        # cast where the dtype is already right, so an unmerged forward costs no more Python than HF PEFT's
        out_dtype, own, with_variant = result.dtype, getattr(self, self.factors_attr), self.lora_variant
        for name in names:  # in order: a variant may depend on the output so far (as in HF PEFT)
            if name not in own:
                continue
            variant = with_variant.get(name) if with_variant else None
            result = (result + self.adapter_output(name, x) if variant is None
                      else variant.add_to(self, name, x, result))
        return result if result.dtype == out_dtype else result.to(out_dtype)

    def merge_one(self, name, safe_merge):
        self._variant_cache.pop("row-sq-key", None)  # the base weight changes
        variant = self.lora_variant.get(name)
        if variant is None:
            return super().merge_one(name, safe_merge)
        base, delta_b = self.get_base_layer(), self.delta_bias(name)  # lora_bias merges as for plain LoRA
        merged = variant.merged_weight(self, name)
        bias = None if delta_b is None else base.bias.data + delta_b.to(base.bias.dtype)
        if safe_merge and not all(torch.isfinite(t).all() for t in (merged, bias) if t is not None):
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        base.weight.data = merged
        if bias is not None:
            base.bias.data = bias

    def unmerge_one(self, name):
        self._variant_cache.pop("row-sq-key", None)
        variant = self.lora_variant.get(name)
        if variant is None:
            return super().unmerge_one(name)
        base, delta_b = self.get_base_layer(), self.delta_bias(name)
        base.weight.data = variant.unmerged_weight(self, name)
        if delta_b is not None:
            base.bias.data -= delta_b.to(base.bias.dtype)

    # ---- variants' own state: frozen factors, saved buffers, deletion (variants/base.py LoraVariant hooks)
    def frozen_parameters(self, name):
        variant = self.lora_variant.get(name)
        return () if variant is None else variant.frozen_parameters(self, name)

    def adapter_tensors(self, name):
        yield from self.adapter_parameters(name)
        variant = self.lora_variant.get(name)
        if variant is not None:
            yield from variant.extra_tensors(self, name)

    def delete_adapter(self, name):
        variant = self.lora_variant.get(name)
        super().delete_adapter(name)
        if variant is not None:
            variant.delete(self, name)

    def _product(self, name: str) -> torch.Tensor:
        """(B @ A) * scaling in float32 when the adapter is half precision on CPU (no half matmul there)."""
        a, b = self.lora_weights(name)
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            return ((b.float() @ a.float()) * self.scaling[name]).to(a.dtype)
        return (b @ a) * self.scaling[name]


class Linear(LoraLayer):
    """LoRA for `nn.Linear` and transformers' `Conv1D` (weight stored (in, out): fan_in_fan_out)."""

    def feature_sizes(self, base):
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        in_f, out_f = base.weight.shape  # Conv1D: (in, out)
        return in_f, out_f

    def build(self, name, r, lora_bias):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def lora_path(self, name, x):
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(self.cast_input(x, a.weight.dtype))) * self.scaling[name]

    def adapter_output(self, name, x, *args, **kwargs):
        if name in self.lora_variant or type(self).lora_path is not Linear.lora_path:
            return super().adapter_output(name, x, *args, **kwargs)
        a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        x = self.cast_input(x, a.weight.dtype)  # before dropout, as HF PEFT
        # training with dropout: keep x, not dropout(x), for backward (lean_dropout.py); not while compiling
        # (RNG state capture does not trace; the compiled graph plans memory itself)
        if lean_applies(dropout) and not torch.compiler.is_compiling():
            return lean_lora_output(x, dropout, a, b, self.scaling[name])
        return b(a(dropout(x))) * self.scaling[name]

    def adapted_forward(self, x, names, *args, **kwargs):
        # one adapter with a variant may form the whole output itself (DoRA: one GEMM with the rescaled
        # weight, variants/dora_scaled.py); None: the base output plus the adapters' as usual
        if self.lora_variant and not args and not kwargs:
            own = [n for n in names if n in self.lora_A]
            if len(own) == 1 and own[0] in self.lora_variant:
                out = self.lora_variant[own[0]].layer_output(self, own[0], x)
                if out is not None:
                    return out
        return super().adapted_forward(x, names, *args, **kwargs)

    def add_adapters(self, result, x, names, *args, **kwargs):
        # no autograd: the sum formed in place in tensors this forward made (inplace.py), same values
        if (type(self).adapter_output is Linear.adapter_output and type(self).lora_path is Linear.lora_path
                and inplace.applies(self, result, x)):
            return inplace.add_adapters(self, result, x, names)
        return super().add_adapters(result, x, names, *args, **kwargs)

    def base_path(self, x):
        w = self.get_base_layer().weight
        return F.linear(x, (w.T if self.fan_in_fan_out else w).to(x.dtype))

    def delta_weight(self, name):
        delta = self._product(name)
        return delta.T if self.fan_in_fan_out else delta

    # --- gathered mixed batches (methods/lora/gathered.py): batched matmuls when the batch has many adapters
    def mixed_forward(self, x, *args, adapter_names, **kwargs):
        # DoRA etc.: the loop (plain membership tests: dict_keys.isdisjoint does not trace under
        # torch.compile)
        with_variant = bool(self.lora_variant) and any(n in self.lora_variant for n in set(adapter_names))
        merged = None if with_variant or args or kwargs else gathered.merged_plan(self, x, adapter_names)
        if merged is not None:  # long rows, few adapters: one matmul per adapter with W + s B A
            return gathered.merged_forward(self, x, merged, adapter_names)
        groups = None if with_variant else gathered.plan(self, adapter_names)
        if groups is None:
            return super().mixed_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return gathered.mixed_forward(self, x, groups, adapter_names, *args, **kwargs)
    # --- end gathered mixed batches


class Embedding(LoraLayer):
    """LoRA for `nn.Embedding`: A (r, vocab) is looked up like an embedding table, B (dim, r) projects."""

    is_embedding = True
    variant_kind = "embedding"
    factors_attr = "lora_embedding_A"

    def feature_sizes(self, base):
        return base.num_embeddings, base.embedding_dim

    def build(self, name, r, lora_bias):
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for embedding layers; set lora_bias=False.")
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))

    def lora_weights(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def lora_B_bias(self, name):
        return None

    def adapter_output(self, name, x, *args, **kwargs):
        variant = self.lora_variant.get(name)
        return self.lora_path(name, x) if variant is None else variant.contribution(self, name, x, None)

    def lora_path(self, name, x):  # no dropout on embeddings (as HF PEFT)
        a, b = self.lora_weights(name)
        return (self._embed(x, a.T) @ b.T) * self.scaling[name]  # (..., r) @ (r, dim)

    def base_path(self, x):
        return self._embed(x, self.get_base_layer().weight)

    def _embed(self, x, table):
        base = self.get_base_layer()
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def delta_weight(self, name):
        return self._product(name).T  # (vocab, dim) like the base table


class Conv(LoraLayer):
    """LoRA for Conv1d/2d/3d: A is a conv with the base kernel, B a 1x..x1 conv (grouped like the base)."""

    variant_kind = "conv"

    def feature_sizes(self, base):
        return base.in_channels, base.out_channels

    def build(self, name, r, lora_bias):
        base = self.get_base_layer()
        if r % base.groups:
            raise ValueError(
                f"LoRA on a {type(base).__name__} with groups={base.groups} needs a rank divisible by "
                f"groups; got r={r}. Pick r as a multiple of {base.groups} (rank_pattern can "
                "set it for this layer)."
            )
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def lora_path(self, name, x):
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(self.cast_input(x, a.weight.dtype))) * self.scaling[name]

    def base_path(self, x):
        base = self.get_base_layer()
        return base._conv_forward(x, base.weight.to(x.dtype), None)

    def delta_weight(self, name):
        if self.get_base_layer().groups > 1:
            raise NotImplementedError(
                "Merging LoRA into a grouped convolution (groups > 1) is not supported.")
        a, b = self.lora_weights(name)
        # W'[o, i, k...] = sum_r B[o, r] A[r, i, k...]
        delta = torch.einsum("or,ri...->oi...", b.flatten(1).float(), a.float()) * self.scaling[name]
        return delta.to(a.dtype)


class MultiheadAttention(LoraLayer):
    """LoRA for `nn.MultiheadAttention` (packed q/k/v): on `in_proj_weight` and, nested, on `out_proj`.

    MHA's forward never calls `out_proj.forward`, so both deltas are added to the weights functionally.
    """

    # HF PEFT 0.21 applies out_proj's delta twice (its MHA merge adds it, then the nested layer's merge adds
    # it again, in forward and in merge_and_unload alike). Adapters trained there rely on it, so outputs and
    # merges here use the same effective out_proj update, 2 * (alpha / r) * B @ A, to load them unchanged.
    OUT_PROJ_DELTA_FACTOR = 2.0
    variant_kind = "nn.MultiheadAttention"  # in no row of variants/table.py: DoRA is refused, as in HF PEFT

    def __init__(self, base_layer, adapter_name, config, r, lora_alpha, **kwargs):
        variant_table.choose(self.variant_kind, config)  # refuse before out_proj gets wrapped
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim.")
        out = Linear(base_layer.out_proj, adapter_name, config, r, lora_alpha)
        out.nested = True
        base_layer.out_proj = out
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, **kwargs)

    @property
    def out_lora(self) -> Linear:
        return self.base_layer.out_proj

    def feature_sizes(self, base):
        return base.embed_dim, 3 * base.embed_dim

    def build(self, name, r, lora_bias):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def update_layer(self, adapter_name, config, r, lora_alpha, **kwargs):
        super().update_layer(adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        if adapter_name not in self.out_lora.adapter_names():
            self.out_lora.update_layer(adapter_name, config, r=r, lora_alpha=lora_alpha)

    def delta_weight(self, name):
        return self._product(name)

    @property
    def weight(self):
        return self.base_layer.in_proj_weight

    def out_delta(self, name):
        return self.OUT_PROJ_DELTA_FACTOR * self.out_lora.delta_weight(name)

    def _trained_out_delta(self, name):
        """out_delta for the forward pass: HF PEFT's second copy sits in the weight's data, outside autograd,
        so gradients see the delta once (training matches HF PEFT step for step)."""
        delta = self.out_lora.delta_weight(name)
        return delta + (self.OUT_PROJ_DELTA_FACTOR - 1) * delta.detach()

    def merge_one(self, name, safe_merge):
        w_in, w_out = self.base_layer.in_proj_weight, self.out_lora.base_layer.weight
        merged_in = w_in.data + self.delta_weight(name).to(w_in.dtype)
        merged_out = w_out.data + self.out_delta(name).to(w_out.dtype)
        if safe_merge and not (torch.isfinite(merged_in).all() and torch.isfinite(merged_out).all()):
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        w_in.data, w_out.data = merged_in, merged_out

    def unmerge_one(self, name):
        w_in, w_out = self.base_layer.in_proj_weight, self.out_lora.base_layer.weight
        w_in.data -= self.delta_weight(name).to(w_in.dtype)
        w_out.data -= self.out_delta(name).to(w_out.dtype)

    def delete_adapter(self, name):
        super().delete_adapter(name)
        self.out_lora.delete_adapter(name)

    def release(self):
        self.base_layer.out_proj = self.out_lora.release()
        return self.base_layer

    def adapter_output(self, name, x, *args, **kwargs):  # pragma: no cover - MHA overrides forward
        raise NotImplementedError

    def forward(self, query, key, value, **kwargs):
        if self.call_adapter_names(kwargs) is not None:
            raise TypeError("LoRA on nn.MultiheadAttention does not support mixed-adapter batches.")
        if self._disable_adapters and self.merged:
            self.unmerge()
        active = [] if self._disable_adapters or self.merged else [
            n for n in self._active_adapters if n in self.adapter_names()]
        if not active:
            return self.base_layer(query, key, value, **kwargs)
        return self._forward_with_deltas(query, key, value, active, **kwargs)

    def _forward_with_deltas(self, query, key, value, active, key_padding_mask=None, need_weights=True,
                             attn_mask=None, average_attn_weights=True, is_causal=False):
        mha, out = self.base_layer, self.out_lora.base_layer
        w_in = mha.in_proj_weight + sum(self.delta_weight(n).to(mha.in_proj_weight.dtype) for n in active)
        w_out = out.weight + sum(self._trained_out_delta(n).to(out.weight.dtype) for n in active)
        batched = query.dim() == 3
        if mha.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        attn, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, w_in, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, mha.dropout, w_out, out.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if mha.batch_first and batched:
            attn = attn.transpose(0, 1)
        return attn, weights
