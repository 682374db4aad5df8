"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354).

The paper's rule (Sec. 4, eta_B = lambda * eta_A with lambda >> 1) is applied through optimizer parameter
groups: A factors train at `lr`, B factors at `lr * loraplus_lr_ratio`, LoRA embedding factors at their own
rate.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.optim import Optimizer

from ..errors import AdapterStateError
from ..methods.lora.layer import Embedding as LoraEmbedding
from ..methods.lora.layer import LoraLayer

# bitsandbytes optimizers that need 32-bit state for embedding weights (as in HF PEFT)
_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """Every LoRA layer of `model` (nested ones included); raises when there is none."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and m.adapter_names()]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers: LoRA+ / LoRA-FA optimizers need a model with LoRA "
            "adapters (e.g. from get_peft_model(model, LoraConfig(...)))."
        )
    return layers


def require_trainable(model: nn.Module, builder: str, frozen: frozenset[int] = frozenset()) -> None:
    """Refuse to build an optimizer that would train nothing (HF PEFT builds it silently).

    `frozen`: ids of parameters the optimizer itself freezes (LoRA-FA's A factors)."""
    if any(p.requires_grad and id(p) not in frozen for p in model.parameters()):
        return
    extra = " besides the LoRA A factors that LoRA-FA freezes" if frozen else ""
    raise AdapterStateError(
        f"{builder}: the model has no trainable parameters{extra}, so this optimizer would change nothing. "
        "An adapter loaded with PeftModel.from_pretrained(..., is_trainable=False) (the default) is frozen: "
        "load it with is_trainable=True, or call model.set_requires_grad(adapter_name) before "
        "building the optimizer."
    )


def lora_factors(layer: LoraLayer, name: str) -> tuple[nn.Parameter, nn.Parameter] | None:
    """The (A, B) weight pair of adapter `name` in `layer`, read from the layer's dicts; None if absent."""
    if name in layer.lora_A and name in layer.lora_B:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in layer.lora_embedding_A and name in layer.lora_embedding_B:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _roles(model: nn.Module) -> dict[int, str]:
    """Map id(parameter) -> "A", "B" or "embedding" for the factors found structurally in the LoRA layers."""
    roles: dict[int, str] = {}
    for layer in lora_layers(model):
        if isinstance(layer, LoraEmbedding):
            # everything the embedding layer holds directly (its factors, its base table) counts as embedding
            for name in layer.adapter_names():
                for attr in ("lora_embedding_A", "lora_embedding_B"):
                    if name in getattr(layer, attr):
                        roles[id(getattr(layer, attr)[name])] = "embedding"
            for param in layer.get_base_layer().parameters(recurse=False):
                roles[id(param)] = "embedding"
            continue
        for name in layer.adapter_names():
            if name in layer.lora_A:
                for param in layer.lora_A[name].parameters():
                    roles[id(param)] = "A"
            if name in layer.lora_B:
                roles[id(layer.lora_B[name].weight)] = "B"
    return roles


def _layernorm_params(model: nn.Module) -> set[int]:
    """ids of parameters living inside an `nn.LayerNorm` (never weight-decayed, as in transformers'
    Trainer)."""
    return {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs
) -> Optimizer:
    """Build `optimizer_cls` over the trainable parameters of a LoRA model with LoRA+ learning rates.

    Groups, in this order: A factors and other matrices (`lr`), LoRA embedding factors
    (`loraplus_lr_embedding`, default 1e-6), then B factors and other vectors (`lr * loraplus_lr_ratio`),
    split into those with `loraplus_weight_decay` (default 0.0) and those without (biases, LayerNorm
    parameters). Remaining `kwargs` go to `optimizer_cls`.
    """
    roles = _roles(model)
    require_trainable(model, "create_loraplus_optimizer")
    no_decay = _layernorm_params(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in _trainable(model):
        role = roles.get(id(param))
        if role is None:  # not a LoRA factor: vectors follow B, matrices follow A (HF PEFT's rule)
            role = "B" if param.ndim == 1 else "A"
        if role == "B" and ("bias" in name or id(param) in no_decay):
            role = "B_no_decay"
        groups[role].append(param)

    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    kwargs["lr"] = lr
    lr_b = lr * loraplus_lr_ratio
    param_groups = [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr_b},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr_b},
    ]
    optimizer = optimizer_cls(param_groups, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
