"""CPT's encoder (`CPTEmbedding`: frozen example embeddings + a bounded trainable change) and its forward
rules.

Labels cover only the label tokens of the prompt's examples and of the input (type % 4 == 0); the loss can
weigh older examples less (`opt_weighted_loss_type="decay"`). The loss is replaced in `finish`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.prompt import EmbeddingPrompt

TINY_RADIUS = 1e-10  # label tokens (and type 0) may not move at all
REFERENCE_DIM = 2048  # the radii are given for a 2048-wide model and scaled by sqrt(d / 2048)


def _types(config) -> torch.Tensor:
    return torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)


def trainable_rows(config) -> torch.Tensor:
    """(n,) bool: the prompt rows whose change may train (templates and inputs, not labels)."""
    kind = torch.remainder(_types(config), 4)
    return (kind == 1) | (kind == 2) | (kind == 3)


def projection_radii(config) -> torch.Tensor:
    """(n,) float32: the L2 radius each row's change is projected onto."""
    types = _types(config)
    kind = torch.remainder(types, 4)
    scale = torch.sqrt(torch.tensor([config.token_dim / REFERENCE_DIM], dtype=torch.float32))
    format_eps = config.opt_projection_format_epsilon * scale
    input_eps = config.opt_projection_epsilon * scale
    radii = torch.full(types.shape, TINY_RADIUS, dtype=torch.float32)
    radii = torch.where((types > 0) & ((kind == 1) | (kind == 3)), format_eps, radii)
    return torch.where((types > 0) & (kind == 2), input_eps, radii)


class CPTEmbedding(nn.Module):
    """`embedding` (frozen, from the example tokens) + `delta_embedding` (trainable, kept inside L2 balls)."""

    def __init__(self, config, word_embeddings: nn.Module) -> None:
        super().__init__()
        n, dim = config.num_virtual_tokens, config.token_dim
        if config.inference_mode:  # a loaded adapter overwrites the rows with the saved prompt
            base = torch.zeros(n, dim, dtype=torch.float32)
        else:
            ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                base = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding = nn.Embedding(n, dim, _weight=base)
        self.embedding.requires_grad_(False)
        self.delta_embedding = nn.Embedding(n, dim, _weight=torch.zeros(n, dim, dtype=torch.float32))
        # plain tensors, not buffers: the module's state_dict keys stay those of HF PEFT
        self.row_mask = trainable_rows(config)
        self.radii = projection_radii(config)

    def get_epsilon(self) -> torch.Tensor:
        return self.radii.clone()

    def get_projection(self) -> torch.Tensor:
        """The change with every row's L2 norm cut to its radius (rows already inside are unchanged)."""
        with torch.no_grad():
            delta = self.delta_embedding.weight
            norm = torch.norm(delta, p=2, dim=1)
            radii = self.radii.to(delta.device)
            scale = torch.where(norm > 0, radii / torch.maximum(norm, radii), torch.ones_like(norm))
            return delta * scale.to(delta.dtype).view(-1, 1)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            base = self.embedding(indices)
            self.delta_embedding.weight.copy_(self.get_projection())  # keep the stored change projected
        weight = self.delta_embedding.weight
        keep = self.row_mask.to(weight.device).view(-1, 1)
        weight = torch.where(keep, weight, weight.detach())  # label rows get no gradient
        return base + F.embedding(indices, weight)


# -------------------------------------------------------------------------------------------- labels and loss
def cpt_targets(config, labels: torch.Tensor, input_type_mask: torch.Tensor | None):
    """Labels and token types over prompt + input: (B, n + T) each; non-label positions get -100."""
    batch, length = labels.shape
    device = labels.device
    if input_type_mask is None:
        input_types = torch.full((batch, length), 4, dtype=torch.long, device=device)  # every token a label
    else:
        if tuple(input_type_mask.shape) != (batch, length):
            raise ValueError(f"input_type_mask has shape {tuple(input_type_mask.shape)} but labels have "
                             f"{(batch, length)}; give one type per input token.")
        input_types = input_type_mask.to(device).long()
    prompt_types = _types(config).to(device).expand(batch, -1)
    # the input's examples come after the prompt's: shift their type ids past the prompt's largest
    input_types = torch.where(input_types > 0, input_types + prompt_types.max(), input_types)
    types = torch.cat([prompt_types, input_types], dim=1)
    prompt_ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=device).expand(batch, -1)
    ids = torch.cat([prompt_ids, labels.long()], dim=1)
    is_label = (types > 0) & (torch.remainder(types, 4) == 0)
    return torch.where(is_label, ids, torch.full_like(ids, -100)), types


def decay_weights(types: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, S) float32: per sample, label group k-th from the newest weighs factor**k; other positions 1."""
    weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
    for row, row_types in enumerate(types):
        groups = row_types[(row_types > 0) & (torch.remainder(row_types, 4) == 0)].unique(sorted=True)
        value = 1.0
        for group in groups.flip(0).tolist():
            weights[row][row_types == group] = value
            value *= factor
    return weights


def cpt_loss(logits: torch.Tensor, targets: torch.Tensor, types: torch.Tensor, config) -> torch.Tensor:
    """Mean next-token cross-entropy over the label positions, optionally weighted by `decay_weights`."""
    logits = logits[:, :-1]
    targets = targets[:, 1:].to(logits.device)
    types = types[:, 1:].to(logits.device)
    batch, steps, vocab = logits.shape
    ce = F.cross_entropy(logits.reshape(batch * steps, vocab), targets.reshape(-1), reduction="none",
                         ignore_index=-100).view(batch, steps)
    valid = targets != -100
    weights = valid.float()
    if config.opt_weighted_loss_type == "decay":
        weights = weights * decay_weights(types, config.opt_loss_decay_factor)
    return (ce[valid] * weights[valid]).mean()


def _replace_loss(outputs, loss: torch.Tensor):
    if isinstance(outputs, tuple):  # return_dict=False: (loss, logits, ...) since labels were passed
        return (loss, *outputs[1:])
    outputs.loss = loss
    return outputs


# ---------------------------------------------------------------------------------------------- the method
class CPT(EmbeddingPrompt):
    """Context-aware prompt tuning: causal LMs only; `input_type_mask` is an extra forward keyword."""

    def build_encoder(self, config, word_embeddings):
        return CPTEmbedding(config, word_embeddings)

    def after_activation(self, encoder: nn.Module) -> None:
        encoder.embedding.weight.requires_grad_(False)  # only the bounded change trains

    def transform(self, encoder, config, model, word_embeddings, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels", None)
        input_type_mask = kwargs.pop("input_type_mask", None)
        inputs = super().transform(encoder, config, model, word_embeddings, kwargs)
        if labels is not None:
            # the base model's own loss is computed on these and then replaced in `finish`
            inputs["labels"] = cpt_targets(config, labels, input_type_mask)[0]
        return inputs

    def finish(self, encoder, config, outputs, kwargs: dict[str, Any]):
        """Replace the base model's loss with CPT's (`kwargs` are the caller's forward inputs)."""
        labels = kwargs.get("labels")
        if labels is None:
            return outputs
        targets, types = cpt_targets(config, labels, kwargs.get("input_type_mask"))
        logits = outputs[1] if isinstance(outputs, tuple) else outputs.logits
        return _replace_loss(outputs, cpt_loss(logits, targets, types, config))

    def generate(self, encoder, config, model, word_embeddings, kwargs: dict[str, Any]):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("input_type_mask", "labels")}
        return super().generate(encoder, config, model, word_embeddings, kwargs)
