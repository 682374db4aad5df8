"""VeLoRA, `velora_config=VeloraConfig(...)` (Miles et al. 2024, "VeLoRA: Memory Efficient Training using
Rank-1 Sub-Token Projections", arXiv:2405.17991).

Outputs are plain LoRA's; only the backward of the A projection changes. Instead of the input x (tokens, in)
the forward keeps one number per sub-token: x is cut into G groups of g = ceil(in / G) features (zero padded),
and each group is projected on a unit vector v (g,): c = x_grouped . v, (tokens, G) (section 3, eq. 2). The
backward rebuilds x ~ scale * c v^T and uses it for A's gradient; the input's own gradient is exact. v
(`lora_velora_embed`, saved with the adapter as in HF PEFT) is the normalised mean sub-token of each training
batch ("batch_average"), of the first one ("batch_average_once") or random ("random").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..subconfig import register_coercion
from .base import AdditiveMerge

INIT_TYPES = ("batch_average", "batch_average_once", "random")


@dataclass
class VeloraConfig:
    """VeLoRA's settings (HF PEFT 0.21's names and defaults)."""

    num_groups: int = field(default=64, metadata={
        "help": "Groups G the input features are cut into; more groups: a closer "
                "rebuilt input, more memory."})
    scale: float = field(default=1.0, metadata={"help": "Factor on the rebuilt input in the backward."})
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(
        default="batch_average", metadata={
            "help": "Projection vector: mean sub-token of every training batch ('batch_average'), of the "
                    "first one ('batch_average_once'), or random ('random')."})

    def __post_init__(self) -> None:
        if self.num_groups <= 0:
            raise ValueError(f"VeloraConfig.num_groups must be positive, got {self.num_groups}.")
        if self.scale <= 0:
            raise ValueError(f"VeloraConfig.scale must be positive, got {self.scale}.")
        if self.init_type not in INIT_TYPES:
            raise ValueError(
                f"VeloraConfig.init_type must be one of {list(INIT_TYPES)}, got {self.init_type!r}.")


register_coercion("velora_config", VeloraConfig)  # LoraConfig.velora_config: a file holds a dict


# --------------------------------------------------------------------------------------------- the projection
def group_size(in_features: int, groups: int) -> int:
    return -(-in_features // groups)


def sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., in) -> (tokens, G, g), the features zero padded to G * g."""
    g = group_size(x.shape[-1], groups)
    x = F.pad(x, (0, groups * g - x.shape[-1]))
    return x.reshape(-1, groups, g)


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| in float32; a zero vector becomes the normalised all-ones one."""
    v = v.float()
    if not bool(v.any()):
        v = torch.ones_like(v)
    return v / torch.linalg.vector_norm(v)


class _CompressedInputLinear(torch.autograd.Function):
    """y = x A^T whose backward sees x only through its sub-token projections (the VeLoRA backward)."""

    @staticmethod
    def forward(ctx, x, weight, v, groups: int, scale: float):
        ctx.shape, ctx.dtype, ctx.groups, ctx.scale = x.shape, x.dtype, groups, scale
        codes = sub_tokens(x, groups) @ v.to(x.dtype)  # (tokens, G)
        ctx.save_for_backward(codes, weight, v)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        codes, weight, v = ctx.saved_tensors
        dtype, in_features = grad.dtype, ctx.shape[-1]
        grad = grad.reshape(-1, grad.shape[-1])  # (tokens, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(dtype)).reshape(ctx.shape).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (codes.to(dtype).unsqueeze(-1) * v.to(dtype)).flatten(1)[:, :in_features] * ctx.scale
            grad_w = (grad.T @ rebuilt).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class BufferDict(nn.Module):
    """adapter name -> tensor, kept as persistent buffers (state-dict key `<attr>.<adapter name>`)."""

    def __contains__(self, name) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=True)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]


# ---------------------------------------------------------------------------------------------- the variant
class Velora(AdditiveMerge):
    """VeLoRA on a linear layer (incl. Conv1D): the layer gains `lora_velora_embed` (a BufferDict)."""

    def init(self, layer, name):
        cfg = self.config.velora_config
        if not hasattr(layer, "lora_velora_embed"):
            layer.lora_velora_embed = BufferDict()
        weight = layer.get_base_layer().weight
        g = group_size(layer.in_features, cfg.num_groups)
        self.initialized = cfg.init_type == "random"  # batch averages are taken at the first training forward
        v = (unit(torch.randn(g, device=weight.device, dtype=weight.dtype)) if self.initialized
             else torch.zeros(g))
        # HF PEFT rounds v to the base dtype and, for a half-precision base, keeps it in float32 (adapter
        # autocast)
        stored = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        layer.lora_velora_embed[name] = v.to(device=weight.device, dtype=weight.dtype).to(stored)

    def extra_tensors(self, layer, name):
        return ((f"lora_velora_embed.{name}", layer.lora_velora_embed[name]),)

    def delete(self, layer, name):
        if name in layer.lora_velora_embed:
            del layer.lora_velora_embed[name]

    @torch.no_grad()
    def update_projection(self, layer, name, x):
        cfg = self.config.velora_config
        if cfg.init_type == "random" or (cfg.init_type == "batch_average_once" and self.initialized):
            return
        old = layer.lora_velora_embed[name]
        mean = sub_tokens(x.detach(), cfg.num_groups).flatten(0, 1).mean(0)  # mean sub-token (g,)
        layer.lora_velora_embed[name] = unit(mean).to(device=old.device, dtype=old.dtype)
        self.initialized = True

    def contribution(self, layer, name, x, result):
        cfg = self.config.velora_config
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        x = layer.lora_dropout[name](layer.cast_input(x, lora_a.weight.dtype))
        if layer.training and torch.is_grad_enabled():
            self.update_projection(layer, name, x)
            v = layer.lora_velora_embed[name]
            after_a = _CompressedInputLinear.apply(x, lora_a.weight, v, cfg.num_groups, cfg.scale)
        else:
            after_a = lora_a(x)
        return lora_b(after_a) * layer.scaling[name]
