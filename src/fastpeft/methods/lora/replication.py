"""LoRA's `layer_replication`: rebuild the decoder stack from ranges of existing layers.

Copies of a layer share its base parameters (same tensors) and get their own LoRA once targets are injected.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

# where the block list lives below the innermost `.model` (and `.bert`), tried in this order
LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Llama-style `layers`", ("layers",)),
    ("BERT-style `encoder.layer`", ("encoder", "layer")),
    ("Falcon-style `h`", ("h",)),
)


def supported_layouts() -> str:
    return ", ".join(label for label, _ in LAYOUTS)


def find_layer_list(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The module that owns the block list and the attribute path to it (same lookup as HF PEFT)."""
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):
        model = model.bert
    for _, path in LAYOUTS:
        found = model
        for attr in path:
            found = getattr(found, attr, None)
        if found is not None:
            if not isinstance(found, nn.ModuleList):
                break
            return model, path
    raise ValueError(
        f"layer_replication: cannot find the model's list of transformer blocks in {type(model).__name__}; "
        f"supported architectures: {supported_layouts()} (an nn.ModuleList, below any nested `.model`)."
    )


def check_layer_map(layer_map, num_layers: int) -> list[tuple[int, int]]:
    """Validate `[[start, end], ...]` (end exclusive) against a stack of `num_layers` blocks."""
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ValueError(
            f"layer_replication must be a non-empty list of [start, end] pairs, got {layer_map!r}.")
    ranges = []
    for pair in layer_map:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(i, int) for i in pair):
            raise ValueError(f"layer_replication entries must be [start, end] integer pairs, got {pair!r}.")
        start, end = pair
        if not 0 <= start < end <= num_layers:
            raise ValueError(
                f"layer_replication range {list(pair)} is invalid for a model with {num_layers} layers: "
                f"need 0 <= start < end <= {num_layers} (end is exclusive)."
            )
        ranges.append((start, end))
    return ranges


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are the very same tensors as `module`'s (buffers are copied)."""
    keep = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo=keep)


def renumber(block: nn.Module, index: int) -> None:
    """Point transformers' per-layer `layer_idx` (KV-cache slot) at the block's new position."""
    for sub in block.modules():
        if hasattr(sub, "layer_idx"):
            sub.layer_idx = index


def replicate_layers(model: nn.Module, layer_map) -> Callable[[], None]:
    """Replace the block list by the concatenation of `layer_map`'s ranges, e.g. [[0, 2], [1, 2]] -> 0, 1,
    1. Returns the step that puts the original list (and layer count) back, for a failed injection."""
    owner, path = find_layer_list(model)
    parent = owner
    for attr in path[:-1]:
        parent = getattr(parent, attr)
    old = getattr(parent, path[-1])
    ranges = check_layer_map(layer_map, len(old))
    new = nn.ModuleList(shared_copy(old[i]) for start, end in ranges for i in range(start, end))
    for index, block in enumerate(new):
        renumber(block, index)
    setattr(parent, path[-1], new)
    config = getattr(owner, "config", None)
    counted = config is not None and hasattr(config, "num_hidden_layers")
    if counted:
        config.num_hidden_layers = len(new)

    def undo() -> None:  # the copies were renumbered, the original blocks never were
        setattr(parent, path[-1], old)
        if counted:
            config.num_hidden_layers = len(old)
    return undo
