"""Where bottleneck adapters sit in each supported architecture.

An entry names, per location ("mh_adapter": the attention's output block, "output_adapter": the feed-forward
output block), a full-match regex over module names whose group `layer` is the transformer layer index, and
the names of the block's dense / dropout / LayerNorm children. The block computes
`LayerNorm(dropout(dense(h)) + input_tensor)`; the adapter goes between the dropout and the residual, as in
the `adapters` library's BERT-family modules (`bottleneck_layer_forward`). AdapterHub files name the same
blocks, so the regexes also map their keys (`<block>.adapters.<name>.<tensor>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

LOCATIONS = ("mh_adapter", "output_adapter")


@dataclass(frozen=True)
class Architecture:
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]  # class names of the output blocks (checked before wrapping)
    patterns: dict[str, str]  # location -> full-match regex over module names, group `layer`
    dense: str = "dense"
    dropout: str = "dropout"
    layer_norm: str = "LayerNorm"


_ENCODER = r"(?:.*\.)?encoder\.layer\.(?P<layer>\d+)\."
_BERT_PATTERNS = {"mh_adapter": _ENCODER + r"attention\.output", "output_adapter": _ENCODER + "output"}

ARCHITECTURES = (
    Architecture(("bert",), ("BertSelfOutput", "BertOutput"), _BERT_PATTERNS),
    Architecture(("roberta",), ("RobertaSelfOutput", "RobertaOutput"), _BERT_PATTERNS),
    Architecture(("xlm-roberta",), ("XLMRobertaSelfOutput", "XLMRobertaOutput"), _BERT_PATTERNS),
    Architecture(("electra",), ("ElectraSelfOutput", "ElectraOutput"), _BERT_PATTERNS),
)
SUPPORTED_MODEL_TYPES = tuple(t for arch in ARCHITECTURES for t in arch.model_types)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_for(model: nn.Module) -> Architecture:
    """The table entry of `model`'s `config.model_type`; an unsupported model is refused naming the
    supported ones."""
    model_type = model_type_of(model)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise NotImplementedError(
        f"Bottleneck adapters are not available for model_type {model_type!r}: fastpeft knows where they go "
        f"in {list(SUPPORTED_MODEL_TYPES)} (methods/bottleneck/architectures.py). Use another method (e.g. "
        "LoRA) for this model.")


def locate(arch: Architecture, name: str) -> tuple[str, int] | None:
    """(location, layer index) of module `name` if it is one of `arch`'s output blocks."""
    for location in LOCATIONS:
        match = re.fullmatch(arch.patterns[location], name)
        if match:
            return location, int(match.group("layer"))
    return None


def check_block(arch: Architecture, name: str, module: nn.Module) -> None:
    """A module at an output block's path must be such a block, with the children the adapter calls."""
    missing = [a for a in (arch.dense, arch.dropout, arch.layer_norm) if not hasattr(module, a)]
    if type(module).__name__ not in arch.block_classes or missing:
        raise NotImplementedError(
            f"Module '{name}' ({type(module).__name__}) is not an output block bottleneck adapters know "
            f"({list(arch.block_classes)}; missing children: {missing}). The model's layout differs from the "
            "table in methods/bottleneck/architectures.py.")
