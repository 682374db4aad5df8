"""X-LoRA's forward for the LoRA layers that hold the experts.

Each LoRA layer keeps its experts (adapters "0", "1", ...) and gets this forward instead of its own: the base
output plus, for expert i, `B_i A_i (dropout(x * s_i)) * scaling_i * global_scaling_weight`, where s_i
(batch, seq) are expert i's scalings at this layer (arXiv:2402.07148, eq. 2; the scaling multiplies the input
of A, as in HF PEFT, so a lora_B bias is not scaled by s_i). Outside an X-LoRA call (no scalings) every
expert counts with weight 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import XLoraConfig

if TYPE_CHECKING:
    from .model import XLoraModel


class XLoraLayer:
    """Replaces the `forward` of one LoRA layer (`target`); `layer_number` is its row in the scalings."""

    def __init__(self, model: XLoraModel, target: nn.Module, target_forward, layer_number: int,
                 config: XLoraConfig) -> None:
        self.model = model
        self.target = target
        self.target_forward = target_forward
        self.layer_number = layer_number
        self.config = config

    @property
    def adapters_disabled(self) -> bool:
        """Whether X-LoRA is disabled (`disable_adapter()`): then the layer gives the base output."""
        return self.model.disabled

    @staticmethod
    def apply_scalings_to_x(x: torch.Tensor, scalings_layer: torch.Tensor, adapter: int) -> torch.Tensor:
        # scalings_layer: (batch, seq, n_classes) -> (batch, seq, 1), broadcast over the features
        return x * scalings_layer[:, :, adapter].unsqueeze(-1)

    def get_maybe_topk_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        """This layer's scalings (batch, seq, n_classes), zero outside the top_k_lora largest per token and
        optionally re-normalised over those by a softmax (enable_softmax_topk)."""
        layer_scalings = scalings[:, :, self.layer_number, :]
        if self.config.top_k_lora is not None:
            _, top = torch.topk(layer_scalings, k=self.config.top_k_lora, dim=-1)
            keep = torch.zeros_like(layer_scalings, dtype=torch.bool).scatter_(-1, top, True)
            layer_scalings = layer_scalings * keep.to(layer_scalings.dtype)
        if self.config.enable_softmax_topk:
            kept = layer_scalings != 0
            normalised = torch.softmax(layer_scalings.masked_fill(~kept, float("-inf")), dim=-1)
            layer_scalings = normalised.masked_fill(~kept, 0.0)
        return layer_scalings

    def _layer_scalings(self) -> torch.Tensor | None:
        scalings = self.model.current_scalings
        return None if scalings is None else self.get_maybe_topk_scalings(scalings)

    def _experts(self):
        """(class index, expert name) of the experts this layer holds; the index counts every expert, so a
        layer that lacks one keeps the others' columns."""
        own = getattr(self.target, self.target.factors_attr)
        return [(i, name) for i, name in enumerate(self.model.expert_names) if name in own]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


class XLoraLinearLayer(XLoraLayer):
    """For LoRA's Linear (nn.Linear and transformers' Conv1D)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        base = self.target.get_base_layer()
        if self.adapters_disabled:
            return base(x, *args, **kwargs).to(previous_dtype)
        scalings = self._layer_scalings()
        result = base(x, *args, **kwargs)
        if self.target.merged:
            return result.to(previous_dtype)
        for index, name in self._experts():
            lora_a, lora_b = self.target.lora_A[name], self.target.lora_B[name]
            x = x.to(lora_a.weight.dtype)
            weight = 1.0
            x_in = x
            if scalings is not None:
                x_in, weight = self.apply_scalings_to_x(x, scalings, index), self.config.global_scaling_weight
            delta = lora_b(lora_a(self.target.lora_dropout[name](x_in)))
            # summed in the wider dtype, kept in the base output's (HF PEFT adds in place): fp32 experts on a
            # bf16 base round after each expert
            result = (result + delta * self.target.scaling[name] * weight).to(result.dtype)
        return result.to(previous_dtype)


class XLoraEmbeddingLayer(XLoraLayer):
    """For LoRA's Embedding: the scalings multiply the looked-up rows of A, (batch, seq, r)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.target.get_base_layer()
        if self.adapters_disabled:
            return base(x, *args, **kwargs)
        scalings = self._layer_scalings()
        result = base(x, *args, **kwargs)
        if self.target.merged:
            return result
        # scaled embeddings (e.g. Gemma) scale the base output in forward: the experts' rows too
        embed_scale = getattr(base, "embed_scale", None)
        for index, name in self._experts():
            table_a, table_b = self.target.lora_embedding_A[name], self.target.lora_embedding_B[name]
            after_a = self.target._embed(x, table_a.T)  # (batch, seq, r)
            weight = 1.0
            if scalings is not None:
                after_a = self.apply_scalings_to_x(after_a, scalings, index)
                weight = self.config.global_scaling_weight
            delta = (after_a @ table_b.T) * self.target.scaling[name] * weight
            if isinstance(embed_scale, torch.Tensor):
                delta = delta * embed_scale.to(delta.dtype)
            result = (result + delta).to(result.dtype)  # the base output's dtype, as the Linear case
        return result
