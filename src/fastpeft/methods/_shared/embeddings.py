"""Finding the input embedding and the modules whose weight is tied to it (e.g. an LM head)."""

from __future__ import annotations

from torch import nn

from ...core.layer import AdapterHolder
from ...core.targeting import candidate_modules


def input_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def input_embedding_name(model: nn.Module) -> str | None:
    """The module name of the model's input embedding (as HF PEFT: the first name it is found under)."""
    embedding = input_embedding(model)
    if embedding is None:
        return None
    return next((name for name, module in model.named_modules() if module is embedding), None)


def base_weight(module: nn.Module):
    """The weight tensor under any adapter wrapping (`original_module` / `get_base_layer()`)."""
    module = getattr(module, "original_module", module)
    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(module, "weight", None)


def ties_word_embeddings(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def tied_module_names(model: nn.Module) -> list[str]:
    """Names of embedding / linear modules sharing the input embedding's weight tensor (outside adapter
    layers).

    Empty unless the model's config sets `tie_word_embeddings`, as in HF PEFT.
    """
    embedding = input_embedding(model)
    if embedding is None or not ties_word_embeddings(model):
        return []
    weight = base_weight(embedding)
    own = input_embedding_name(model)
    return [name for name, module in candidate_modules(model, (AdapterHolder,))
            if name != own and isinstance(module, (nn.Embedding, nn.Linear)) and module.weight is weight]
