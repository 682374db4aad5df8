"""KaSA, `kasa_config=KasaConfig(...)` (Wang et al. 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of
Large Language Models", arXiv:2412.06071).

Two changes to LoRA on a linear layer W (out, in), k = min(out, in):
1. at init the base weight loses its r smallest singular components, W <- U_{k-r} S_{k-r} V_{k-r}^T (section
   3.1; destructive: unloading keeps the truncated weight, as in HF PEFT);
2. the update is written in SVD form, dW = s B diag(d) A, with a trained vector d = `lora_diag` (r,) between
   the factors (section 3.2). B starts at zero, so dW = 0 at init; d starts N(0, 1).
The paper's regularisers (eq. 9-11), beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F), are returned by
`kasa_loss` for the caller to add to the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..subconfig import register_coercion
from .base import AdditiveMerge


@dataclass
class KasaConfig:
    """KaSA's regulariser weights (HF PEFT 0.21's names and defaults); used only by `kasa_loss`."""

    beta: float = field(default=1e-4,
                        metadata={"help": "Weight of the L2 penalty sum(lora_diag ** 2) (eq. 9-10)."})
    gamma: float = field(default=1e-3, metadata={
        "help": "Weight of the orthogonality penalty ||B^T B - I||_F + ||A A^T - I||_F (eq. 11)."})

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"KasaConfig.{name} must be non-negative, got {getattr(self, name)}.")


register_coercion("kasa_config", KasaConfig)  # LoraConfig.kasa_config: a file holds a dict, None is off


def uses_kasa(config) -> bool:
    return getattr(config, "kasa_config", None) is not None


def check_new_adapter(peft_config: dict, config) -> None:
    """Refuse mixing KaSA and non-KaSA adapters in one model (the truncated base serves only KaSA), as HF
    PEFT."""
    for name, other in peft_config.items():
        if other is not config and uses_kasa(other) != uses_kasa(config):
            raise ValueError(
                "KaSA truncates the base weights, so KaSA and non-KaSA adapters cannot share a model: the "
                f"new adapter {'uses' if uses_kasa(config) else 'does not use'} kasa_config but adapter "
                f"'{name}' {'does not' if uses_kasa(config) else 'does'}. Load them into separate models."
            )


@torch.no_grad()
def truncate_minor_components(layer, r: int) -> None:
    """Replace the base weight by its best rank-(k - r) approximation (float32 SVD, stored in its dtype)."""
    weight = layer.get_base_layer().weight
    keep = min(weight.shape) - r
    if keep < 1:
        raise ValueError(
            f"kasa_config needs r < min(out_features, in_features) = {min(weight.shape)} so that part of the "
            f"base weight {tuple(weight.shape)} survives the truncation, got r={r}; lower r "
            "(rank_pattern can set it).")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    weight.data = ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)


class Kasa(AdditiveMerge):
    """KaSA on nn.Linear: output base(x) + s B (d * A dropout(x)); the layer gains `lora_diag` (a
    ParameterDict)."""

    def init(self, layer, name):
        if layer.fan_in_fan_out:
            raise ValueError("kasa_config does not support fan_in_fan_out layers such as transformers' "
                             "Conv1D (as HF PEFT); target nn.Linear modules only.")
        if not hasattr(layer, "lora_diag"):
            layer.lora_diag = nn.ParameterDict()
            # trained and saved per adapter
            layer.adapter_param_names = (*layer.adapter_param_names, "lora_diag")
        # drawn in its dtype (HF PEFT's values); placement casts it later
        weight = layer.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else layer.lora_weights(name)[0].dtype
        layer.lora_diag[name] = nn.Parameter(torch.randn(layer.r[name], device=weight.device, dtype=dtype))
        truncate_minor_components(layer, layer.r[name])

    def contribution(self, layer, name, x, result):
        x = layer.cast_input(x, layer.lora_weights(name)[0].dtype)
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        return lora_b(lora_a(layer.lora_dropout[name](x)) * layer.lora_diag[name]) * layer.scaling[name]

    def delta(self, layer, name):
        """s B diag(d) A (out, in); float32 for half-precision factors on CPU."""
        a, b = layer.lora_weights(name)
        d = layer.lora_diag[name]
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            return (((b.float() * d.float()) @ a.float()) * layer.scaling[name]).to(a.dtype)
        return ((b * d) @ a) * layer.scaling[name]


def layer_loss(layer, name: str, beta: float, gamma: float) -> torch.Tensor:
    """beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F) of one layer, in float32 (eq. 9-11)."""
    a, b = (w.float() for w in layer.lora_weights(name))
    d = layer.lora_diag[name].float()
    eye = torch.eye(d.shape[0], device=d.device)
    ortho = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
    return beta * d.square().sum() + gamma * ortho


def kasa_loss(model: nn.Module, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
    """The KaSA regularisers summed over layers and adapters (default: the active ones); 0.0 without KaSA
    layers.

    HF PEFT's `LoraModel._get_kasa_loss`; `model` is a PeftModel or LoraModel (anything with `peft_config`).
    """
    if adapter_names is None:
        adapter_names = list(model.active_adapters)
    elif isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    total: torch.Tensor | float = 0.0
    for module in model.modules():
        diag = getattr(module, "lora_diag", None)
        if not isinstance(diag, nn.ParameterDict):
            continue
        for name in adapter_names:
            if name in diag:
                cfg = model.peft_config[name].kasa_config
                total = total + layer_loss(module, name, cfg.beta, cfg.gamma)
    return total
