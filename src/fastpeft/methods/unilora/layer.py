"""Uni-LoRA layers on nn.Linear and transformers' Conv1D (Li et al., 2025, https://arxiv.org/abs/2506.00799).

A layer's LoRA factors are not parameters of their own: A (r, in) and B (out, r) are gathered from the one
trained vector theta_d (length d, owned by the tuner and shared by every layer) through fixed integer index
tensors of the same shapes, each gathered entry multiplied by a fixed scale 1 / sqrt(n_j), n_j being how many
factor entries of the whole model read theta_d[j] (the paper's isometric projection). The indices and scales
are buffers, rebuilt from `proj_seed` on load unless the file holds them (`save_indices`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.modules import is_conv1d, linear_dims
from .._shared.random_projections import BufferDict

INDEX_NAMES = ("unilora_indices_A", "unilora_indices_B")
SCALE_NAMES = ("unilora_scales_A", "unilora_scales_B")


class UniLoraLinear(AdapterLayer):
    """`base(x) + B (A dropout(x))` with A = theta_d[idx_A] * s_A and B = theta_d[idx_B] * s_B."""

    # the only trained tensor is the tuner's theta_d: adapters are found through the index buffers
    adapter_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, theta_d: nn.ParameterDict,
                 target_name: str = "a linear layer") -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores its weight (in, out)
        self.target_name = target_name
        self.r: dict[str, int] = {}
        self.save_indices: dict[str, bool] = {}  # whether files hold this adapter's indices and scales
        self.unilora_dropout = nn.ModuleDict()
        # the tuner's dict, registered here too so parameter names are HF PEFT's
        # (`<layer>.unilora_theta_d.<adapter>`)
        self.unilora_theta_d = theta_d
        for attr in INDEX_NAMES + SCALE_NAMES:
            setattr(self, attr, BufferDict(persistent=config.save_indices))
        self.update_layer(adapter_name, config, theta_d=theta_d, target_name=target_name)

    def update_layer(self, adapter_name: str, config, theta_d: nn.ParameterDict | None = None,
                     target_name: str | None = None, **kwargs) -> None:
        if theta_d is not None:
            self.unilora_theta_d = theta_d
        r = config.r
        self.r[adapter_name] = r
        self.save_indices[adapter_name] = config.save_indices
        p = config.unilora_dropout
        self.unilora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        for attr in INDEX_NAMES + SCALE_NAMES:
            getattr(self, attr).persistent = config.save_indices
        # placeholders drawn from the global RNG as HF PEFT draws them (the tuner overwrites them with the
        # balanced assignment once every layer is built), so that a seed leaves the RNG where HF PEFT does
        d = config.theta_d_length
        self.unilora_indices_A[adapter_name] = torch.randint(0, d, (r, self.in_features))
        self.unilora_indices_B[adapter_name] = torch.randint(0, d, (self.out_features, r))
        ones = torch.ones(())
        self.unilora_scales_A[adapter_name] = ones.expand(r, self.in_features)
        self.unilora_scales_B[adapter_name] = ones.expand(self.out_features, r)

    def set_indices(self, name: str, index_a: torch.Tensor, index_b: torch.Tensor, inv_sqrt: torch.Tensor,
                    widen: bool) -> None:
        """Install the tuner's assignment: (r, in) and (out, r) indices into theta_d, and their scales
        `inv_sqrt[index]` in the base weight's dtype (float32 where `widen` and that dtype is a half one, as
        HF PEFT's autocast_adapter_dtype leaves them)."""
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if widen and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        device = weight.device if not weight.is_meta else torch.device("cpu")
        for attr, index in zip(INDEX_NAMES, (index_a, index_b)):
            getattr(self, attr)[name] = index.to(device)
        for attr, index in zip(SCALE_NAMES, (index_a, index_b)):
            # rounded through the base dtype first, as HF PEFT (then widened by its dtype cast)
            getattr(self, attr)[name] = inv_sqrt[index].to(weight.dtype).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ adapter bookkeeping
    def adapter_names(self) -> set[str]:
        return set(self.unilora_indices_A.keys())

    def has_adapter(self, name: str) -> bool:
        return name in self.unilora_indices_A

    def adapter_parameters(self, name: str):
        if name in self.unilora_indices_A:
            yield f"unilora_theta_d.{name}", self.unilora_theta_d[name]

    def adapter_tensors(self, name: str):
        """The shared theta_d is written once by the tuner (`extra_file_state`); the layer's indices and
        scales only with save_indices."""
        if not self.save_indices.get(name):
            return []
        return [(f"{attr}.{name}", getattr(self, attr)[name]) for attr in INDEX_NAMES + SCALE_NAMES]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)  # also drops theta_d[name] from the shared dict (every layer goes too)
        for attr in INDEX_NAMES + SCALE_NAMES:
            if name in getattr(self, attr):
                del getattr(self, attr)[name]

    # ------------------------------------------------------------------ math
    def factors(self, name: str, float32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): A (r, in) = theta_d[idx_A] * s_A, B (out, r) = theta_d[idx_B] * s_B."""
        index_a, index_b = self.unilora_indices_A[name], self.unilora_indices_B[name]
        theta = self.unilora_theta_d[name].to(index_a.device)
        scale_a = self.unilora_scales_A[name].to(index_a.device)
        scale_b = self.unilora_scales_B[name].to(index_b.device)
        if float32:
            theta, scale_a, scale_b = theta.float(), scale_a.float(), scale_b.float()
        return theta[index_a] * scale_a, theta[index_b] * scale_b

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a, b = self.factors(name)
        x = self.unilora_dropout[name](x.to(self.unilora_theta_d[name].dtype))
        return F.linear(F.linear(x, a), b)

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A in the base weight's layout ((in, out) for Conv1D)."""
        theta = self.unilora_theta_d[name]
        # half-precision matmuls on CPU are slow or missing: float32 there, back to theta_d's dtype after
        slow_half = self.unilora_indices_A[name].device.type == "cpu" and theta.dtype in (
            torch.float16, torch.bfloat16)
        a, b = self.factors(name, float32=slow_half)
        delta = b @ a
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(theta.dtype) if slow_half else delta
