"""Where the decoder blocks are, how the mirrored shadow backbone is built, and the shadow path's losses."""

from __future__ import annotations

import copy
import inspect
import json

import torch
import torch.nn.functional as F
from torch import nn

# attribute names, in the order they are tried
_BACKBONE_ATTRS = ("model", "transformer", "base_model", "decoder")
_STACK_ATTRS = ("layers", "h")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_INTERMEDIATE = ("intermediate_size", "ffn_dim", "n_inner")
_HEADS = ("num_attention_heads", "n_head", "num_heads")
_HEAD_ATTRS = ("score", "classifier")


def _stack(module: nn.Module) -> tuple[nn.ModuleList, str] | None:
    for attr in _STACK_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, nn.ModuleList):
            return value, attr
    return None


def find_backbone(model: nn.Module) -> nn.Module:
    """The module holding the decoder blocks (`LlamaModel` in `LlamaForCausalLM`; OPT's `model.decoder`)."""
    for attr in _BACKBONE_ATTRS:
        inner = getattr(model, attr, None)
        if not isinstance(inner, nn.Module):
            continue
        nested = getattr(inner, "decoder", None)
        if isinstance(nested, nn.Module) and _stack(nested) is not None:
            return nested
        if _stack(inner) is not None:
            return inner
    if _stack(model) is not None:
        return model
    raise ValueError(
        f"ShadowPEFT found no decoder backbone in {type(model).__name__} (a `.model` / `.transformer` module "
        "holding an nn.ModuleList `.layers` or `.h`). It adapts decoder-only transformers models; set "
        "target_modules to the decoder blocks, e.g. r'.*\\.layers\\.\\d+$', if the blocks live elsewhere.")


def default_block_names(model: nn.Module) -> set[str]:
    """Every decoder block of `model`, by module name."""
    backbone = find_backbone(model)
    layers, attr = _stack(backbone)
    prefix = next(name for name, module in model.named_modules() if module is backbone)
    base = f"{prefix}.{attr}" if prefix else attr
    return {f"{base}.{i}" for i in range(len(layers))}


def hidden_size(config) -> int:
    for attr in _HIDDEN:
        if isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    raise ValueError(f"ShadowPEFT cannot read the hidden size of {type(config).__name__} "
                     f"(none of {_HIDDEN}).")


def _set(config, names: tuple[str, ...], value: int, option: str) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise ValueError(f"ShadowConfig.{option} cannot be applied: {type(config).__name__} has none of {names}. "
                     "Leave it unset for this architecture.")


def _fit_layer_lists(config) -> None:
    """Per-layer config lists (Qwen's `layer_types`, `max_window_layers`) follow the reduced depth."""
    count = int(config.num_hidden_layers) if hasattr(config, "num_hidden_layers") else None
    if count is None:
        return
    types = getattr(config, "layer_types", None)
    if types is not None:
        types = list(types) or ["full_attention"]
        config.layer_types = (types + [types[-1]] * count)[:count]
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int) and window > count:
        config.max_window_layers = count


def build_mirror(model: nn.Module, config) -> nn.Module:
    """A fresh backbone of the base backbone's class from a copy of its config with the shadow_* overrides
    (default depth 1); random init as transformers gives it."""
    base = find_backbone(model)
    cfg = copy.deepcopy(base.config)
    _set(cfg, _LAYERS, config.shadow_num_hidden_layers or 1, "shadow_num_hidden_layers")
    for option, names in (("shadow_hidden_size", _HIDDEN), ("shadow_intermediate_size", _INTERMEDIATE),
                          ("shadow_num_attention_heads", _HEADS)):
        if getattr(config, option) is not None:
            _set(cfg, names, getattr(config, option), option)
    _fit_layer_lists(cfg)
    return type(base)(cfg)


PROJECTED_TYPE = "causal_lm_with_hidden_projection"  # a small LM trained with a projection to a larger base


def load_pretrained(name_or_path: str) -> tuple[nn.Module, nn.Linear | None]:
    """(backbone, trained projection or None) from a model id or folder: a plain transformers checkpoint
    loads with AutoModel; a projected shadow checkpoint (config `model_type` PROJECTED_TYPE) holds the
    backbone's config under `shadow_model_config`, its weights under `shadow_model.` and the projection as
    `shadow_hidden_projection.weight` (shadow width -> base width)."""
    from transformers import AutoModel
    from transformers.utils import cached_file

    with open(cached_file(name_or_path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") != PROJECTED_TYPE:
        return AutoModel.from_pretrained(name_or_path), None
    return _load_projected(name_or_path, raw)


def _load_projected(name_or_path: str, raw: dict) -> tuple[nn.Module, nn.Linear]:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file

    inner = dict(raw["shadow_model_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
    weights = load_file(cached_file(name_or_path, "model.safetensors"))
    prefix = "shadow_model."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                             strict=True)
    weight = weights.get("shadow_hidden_projection.weight")
    if weight is None:
        raise ValueError(f"{name_or_path!r} is a projected shadow checkpoint without "
                         "'shadow_hidden_projection.weight'; it cannot be used as shadow_model.")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return backbone, projection


def freeze_embeddings(backbone: nn.Module) -> None:
    """A pretrained backbone's embedding tables stay frozen: training them is not parameter-efficient."""
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            table = getattr(backbone, getter)()
        except (AttributeError, NotImplementedError):
            table = None
        if isinstance(table, nn.Module):
            table.requires_grad_(False)


def takes_inputs_embeds(module: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(module: nn.Module) -> str:
    """The forward keyword of a transformers model's KV cache (`cache` since transformers 5.x's rename)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache in a transformers model output (either field name), or None."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None


def classifier_head(model: nn.Module) -> nn.Module | None:
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            return head
    return None


# ------------------------------------------------------------------ the shadow path's own task loss (Eq. 8-9)
def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, d): each row's last non-padding position (left or right padding); the last one without a
    mask."""
    if attention_mask is None:
        return hidden[:, -1, :]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last = (attention_mask.ne(0) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' sequence-classification loss: MSE for one label, CE for class ids, BCE otherwise."""
    num_labels = logits.shape[-1]
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against label t + 1 (-100 ignored)."""
    shifted = logits[..., :-1, :].contiguous()
    targets = labels[..., 1:].contiguous().to(shifted.device)
    return F.cross_entropy(shifted.view(-1, shifted.size(-1)), targets.view(-1), ignore_index=-100)
