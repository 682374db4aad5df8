"""The LoRA variant interface: hooks a LoRA layer calls for adapters whose config turns a variant on.

A variant is chosen once per adapter from its config (`table.choose`); plain LoRA has none. `AdditiveMerge`
gives the merge of variants whose update is a plain weight delta (most of them); DoRA (dora.py) merges
differently.
"""

from __future__ import annotations

import torch


class LoraVariant:
    """Hooks a LoRA layer calls for adapters that use this variant (all take the layer and adapter name).

    One instance per adapter and layer, built from the adapter's LoraConfig (kept as `self.config`).
    """

    def __init__(self, config=None) -> None:
        self.config = config

    def init(self, layer, name: str) -> None:
        """Create the variant's extra parameters, after A and B are initialised."""

    def frozen_parameters(self, layer, name: str) -> tuple:
        """Adapter parameters that never train (saved all the same), e.g. MiCA's lora_B."""
        return ()

    def extra_tensors(self, layer, name: str) -> tuple:
        """(key relative to the layer, tensor) of non-parameter state saved in adapter files (buffers)."""
        return ()

    def delete(self, layer, name: str) -> None:
        """Drop the variant's own state of adapter `name` (after the layer dropped A, B and its settings)."""

    def contribution(self, layer, name: str, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        """What the adapter adds to `result` (the output so far; None: only the base output is wanted)."""
        raise NotImplementedError

    def add_to(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the output so far) with the adapter's contribution added; a variant may form the sum in
        one pass (DoRA's fused node)."""
        return result + self.contribution(layer, name, x, result)

    def layer_output(self, layer, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's whole output (base included) with this adapter the only active one, where the variant
        forms it in one piece; None (the default): the base output plus `add_to`."""
        return None

    def merged_weight(self, layer, name: str) -> torch.Tensor:
        """The base weight (stored layout) with the adapter merged in."""
        raise NotImplementedError

    def unmerged_weight(self, layer, name: str) -> torch.Tensor:
        """The base weight with the adapter, merged last, taken out again."""
        raise NotImplementedError


class AdditiveMerge(LoraVariant):
    """Merging for variants whose update is a plain additive weight delta: W +- delta(layer, name)."""

    def delta(self, layer, name: str) -> torch.Tensor:
        """The update in the base weight's stored layout (default: plain LoRA's s B A)."""
        return layer.delta_weight(name)

    def merged_weight(self, layer, name):
        weight = layer.get_base_layer().weight.data
        return weight + self.delta(layer, name).to(weight.dtype)

    def unmerged_weight(self, layer, name):
        weight = layer.get_base_layer().weight.data
        return weight - self.delta(layer, name).to(weight.dtype)
