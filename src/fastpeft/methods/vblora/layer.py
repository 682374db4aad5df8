"""VB-LoRA layers (Li et al., 2024, https://arxiv.org/abs/2405.15179) on linear and GPT-2 Conv1D layers.

A (r, in) and B (out, r) are cut into sub-vectors of the bank's vector length. Each sub-vector has
`num_vectors` logits; it is the softmax(top-k logits)-weighted sum of the matching top-k bank vectors. The
bank is one `nn.ParameterDict` (adapter name -> (num_vectors, vector_length)) owned by the tuner and
referenced by every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims

LOGIT_NAMES = ("vblora_logits_A", "vblora_logits_B")


def mix_bank(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., num_vectors) logits -> (..., vector_length): softmax over the top-k logits weights their bank
    rows."""
    top, index = logits.topk(topk, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * bank[index]).sum(dim=-2)


def new_bank(config) -> nn.Parameter:
    bank = torch.zeros(config.num_vectors, config.vector_length)
    nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
    return nn.Parameter(bank)


def check_layer_sizes(config, in_features: int, out_features: int) -> None:
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if size % config.vector_length:
            raise ValueError(
                f"VB-LoRA: {what}={size} of a target layer is not divisible by "
                f"vector_length={config.vector_length}; choose a vector_length dividing every target's in "
                "and out features, or leave this layer out of target_modules.")


class VBLoRALinear(AdapterLayer):
    """`base(x) + (dropout(x) @ A.T) @ B.T` with A, B mixed from the shared bank by the layer's logits."""

    adapter_param_names = LOGIT_NAMES

    def __init__(self, base_layer: nn.Module, adapter_name: str, config,
                 vector_bank: nn.ParameterDict) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        # read at save time (save_only_topk_weights), as HF PEFT reads its config
        self.vblora_config: dict = {}
        self.vblora_dropout = nn.ModuleDict()
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.vblora_vector_bank = vector_bank
        self.update_layer(adapter_name, config, vector_bank=vector_bank)

    def update_layer(self, adapter_name: str, config, vector_bank: nn.ParameterDict | None = None,
                     **kwargs) -> None:
        check_layer_sizes(config, self.in_features, self.out_features)
        if vector_bank is not None:
            self.vblora_vector_bank = vector_bank
        # HF PEFT redraws the bank for every target before its logits; doing the same keeps seeded inits equal
        self.vblora_vector_bank[adapter_name] = new_bank(config)
        self.r[adapter_name] = config.r
        self.topk[adapter_name] = config.topk
        self.vblora_config[adapter_name] = config
        self.vblora_dropout[adapter_name] = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 \
            else nn.Identity()
        tiles_in, tiles_out = (self.in_features // config.vector_length,
                               self.out_features // config.vector_length)
        logits_a = torch.zeros(config.r, tiles_in, config.num_vectors)
        logits_b = torch.zeros(tiles_out, config.r, config.num_vectors)
        nn.init.normal_(logits_a, 0.0, config.init_logits_std)
        nn.init.normal_(logits_b, 0.0, config.init_logits_std)
        self.vblora_logits_A[adapter_name] = nn.Parameter(logits_a)
        self.vblora_logits_B[adapter_name] = nn.Parameter(logits_b)

    # ---- the bank trains with the adapter but is saved once, by the tuner (see VBLoRAModel.extra_file_state)
    def adapter_parameters(self, name: str):
        yield from super().adapter_parameters(name)
        if name in self.vblora_logits_A:
            yield f"vblora_vector_bank.{name}", self.vblora_vector_bank[name]

    def adapter_tensors(self, name: str):
        """Logits under their own keys, unless the adapter saves the top-k form (written by the tuner)."""
        config = self.vblora_config.get(name)
        if config is not None and config.save_only_topk_weights:
            return []
        return [(key, p) for key, p in super().adapter_parameters(name)]

    def factors(self, name: str, float32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter `name`: A (r, in), B (out, r)."""
        logits_a, logits_b = self.vblora_logits_A[name], self.vblora_logits_B[name]
        if self.training and torch.isinf(logits_a[0, 0]).any():
            raise RuntimeError(
                f"VB-LoRA adapter '{name}' has infinite logits: it was loaded from a save_only_topk_weights "
                "file, which keeps only the top-k logits and cannot be trained further. Train from "
                "a full save instead.")
        bank = self.vblora_vector_bank[name].to(logits_a.device)
        if float32:
            logits_a, logits_b, bank = logits_a.float(), logits_b.float(), bank.float()
        topk = self.topk[name]
        a = mix_bank(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
        b = mix_bank(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return a, b

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a, b = self.factors(name)
        x = self.vblora_dropout[name](x.to(self.vblora_vector_bank[name].dtype))
        return F.linear(F.linear(x, a), b)

    def delta_weight(self, name: str) -> torch.Tensor:
        logits = self.vblora_logits_A[name]
        # half-precision matmuls on CPU are slow or missing: compute in float32 there
        slow_half = logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16)
        a, b = self.factors(name, float32=slow_half)
        delta = b @ a
        return delta.T if self.fan_in_fan_out else delta
