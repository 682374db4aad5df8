"""Attention wrappers adding LLaMA-Adapter's gated attention over learned prompt tokens.

The wrapped attention module is kept as `.model` (as in HF PEFT, so base weights keep HF's state-dict names);
per-adapter tensors live in `adaption_prompt` / `adaption_gate` dicts, stored in files without the adapter
name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer

NOT_MERGEABLE = (
    "Adaption prompts add an attention branch over learned prompt tokens; they cannot be merged into the "
    "base weights. Keep the PeftModel for inference, or call unload() to get the unchanged base model back."
)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _param_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter dtype follows the attention weights; integer (quantized) weights get float32 adapters."""
    return torch.float32 if weight.dtype in (torch.int8, torch.uint8) else weight.dtype


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args:
        return args[0]
    raise ValueError("The adapted attention module was called without hidden_states.")


class AdaptedAttentionBase(AdapterLayer):
    """Adds `gate * softmax(Q K_p^T / sqrt(d)) V_p` (K_p, V_p projected from the prompt) to the attention
    output."""

    adapter_param_names = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        if isinstance(base_layer, AdaptedAttentionBase):
            raise TypeError("This attention module already has adaption prompts; they cannot be stacked.")
        super().__init__(base_layer)
        self._modules["model"] = self._modules.pop("base_layer")  # HF PEFT's attribute name for the original
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.adapter_len: dict[str, int] = {}
        self.update_layer(adapter_name, config, **kwargs)

    @property
    def base_layer(self) -> nn.Module:
        return self._modules["model"]

    # ------------------------------------------------------------------ per model family
    def reference_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def hidden_size(self) -> int:
        raise NotImplementedError

    def query_states(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """(B, H, T, head_dim) queries of the wrapped attention for `hidden`."""
        raise NotImplementedError

    def prompt_key_values(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H, Lp, head_dim) keys and values of adapter `name`'s prompt tokens."""
        raise NotImplementedError

    def project_output(self, out: torch.Tensor) -> torch.Tensor:
        return out

    @property
    def head_dim(self) -> int:
        return self.base_layer.head_dim

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        length = config.adapter_len
        weight = self.reference_weight()
        dtype = _param_dtype(weight)
        prompt = torch.empty(1, length, self.hidden_size(), device=weight.device, dtype=dtype).normal_()
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))
        self.adapter_len[adapter_name] = length

    def adapter_output(self, name: str, query: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The adapter's (B, T, hidden) contribution given the (B, H, T, head_dim) queries."""
        keys, values = self.prompt_key_values(name)
        dtype = query.dtype
        scores = torch.matmul(query, keys.transpose(2, 3).to(dtype)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        weights = self.adaption_gate[name] * probs
        out = torch.matmul(weights, values.to(weights.dtype))
        batch, _, length, _ = query.shape
        return self.project_output(out.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, *args, **kwargs):
        adapter_names = self.call_adapter_names(kwargs)
        outputs = self.base_layer(*args, **kwargs)
        if self._disable_adapters:
            return outputs
        is_tuple = isinstance(outputs, tuple)
        out = outputs[0] if is_tuple else outputs
        hidden = _hidden_states(args, kwargs)
        rows = self._rows_per_adapter(adapter_names, out.shape[0])
        if not rows:
            return outputs
        query = self.query_states(hidden, args, kwargs)
        for name, index in rows.items():
            delta = self.adapter_output(name, query)
            out = out + delta if index is None else out.index_add(0, index, delta[index].to(out.dtype))
        out = out.to(query.dtype)
        return (out, *outputs[1:]) if is_tuple else out

    def _rows_per_adapter(self, adapter_names: list[str] | None,
                          batch: int) -> dict[str, torch.Tensor | None]:
        """{adapter: batch rows it applies to (None: all)} for the active adapters or a mixed batch."""
        own = self.adapter_names()
        if adapter_names is None:
            return {name: None for name in self._active_adapters if name in own}
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch}.")
        device = self.reference_weight().device
        rows = {}
        for name in sorted(set(adapter_names) & own):
            rows[name] = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=device)
        return rows

    # ------------------------------------------------------------------ not applicable
    def delta_weight(self, name: str) -> torch.Tensor:
        raise ValueError(NOT_MERGEABLE)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(NOT_MERGEABLE)


class LlamaAdaptedAttention(AdaptedAttentionBase):
    """Llama / Mistral attention: rotary queries, no rotation on prompt keys, GQA by repeating KV heads."""

    def reference_weight(self) -> torch.Tensor:
        return self.base_layer.q_proj.weight

    def hidden_size(self) -> int:
        return self.base_layer.k_proj.in_features

    def query_states(self, hidden, args, kwargs):
        attn = self.base_layer
        batch, length, _ = hidden.shape
        query = attn.q_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position_embeddings is None:
            raise ValueError(
                f"{type(attn).__name__} was called without position_embeddings=(cos, sin); adaption prompts "
                "need them to rotate the queries. Use transformers >= 4.48, whose Llama / "
                "Mistral layers pass them."
            )
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        return query * cos + rotate_half(query) * sin

    def prompt_key_values(self, name):
        attn = self.base_layer
        prompt = self.adaption_prompt[name]
        if attn.k_proj.weight.is_floating_point():
            prompt = prompt.to(attn.k_proj.weight.dtype)
        key, value = attn.k_proj(prompt), attn.v_proj(prompt)
        kv_heads = key.shape[-1] // self.head_dim
        repeat = (attn.q_proj.out_features // self.head_dim) // kv_heads
        shape = (1, prompt.shape[1], kv_heads, self.head_dim)
        key = key.view(shape).transpose(1, 2).repeat_interleave(repeat, dim=1)
        value = value.view(shape).transpose(1, 2).repeat_interleave(repeat, dim=1)
        return key, value

    def project_output(self, out):
        return self.base_layer.o_proj(out)


class GPT2AdaptedAttention(AdaptedAttentionBase):
    """GPT-2 attention (fused `c_attn`); the adapter output is added without `c_proj`, as in HF PEFT."""

    def reference_weight(self) -> torch.Tensor:
        return self.base_layer.c_proj.weight

    def hidden_size(self) -> int:
        return self.base_layer.embed_dim

    def query_states(self, hidden, args, kwargs):
        attn = self.base_layer
        if kwargs.get("encoder_hidden_states") is not None:
            if not hasattr(attn, "q_attn"):
                raise ValueError(
                    f"{type(attn).__name__} got encoder_hidden_states but has no q_attn: build it with "
                    "is_cross_attention=True to use it as cross-attention."
                )
            query = attn.q_attn(hidden)
        else:
            query = attn.c_attn(hidden).split(attn.split_size, dim=2)[0]
        return query.view(*query.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def prompt_key_values(self, name):
        attn = self.base_layer
        prompt = self.adaption_prompt[name]
        if attn.c_attn.weight.is_floating_point():
            prompt = prompt.to(attn.c_attn.weight.dtype)
        _, key, value = attn.c_attn(prompt).split(attn.embed_dim, dim=2)
        shape = (1, prompt.shape[1], -1, self.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)
