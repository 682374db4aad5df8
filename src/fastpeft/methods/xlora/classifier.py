"""The X-LoRA classifier: the base model's last hidden state -> per-token, per-layer expert scalings.

Shapes: hidden state (batch, seq, hidden) -> logits (batch, seq, n_classes) or, with layerwise_scalings,
(batch, seq, n_layers * n_classes) -> scalings (batch, seq, n_layers, n_classes), where n_layers counts the
LoRA layers (not the model's blocks) and n_classes the experts (arXiv:2402.07148, section 3).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import XLoraConfig


class TemperatureScaledSoftmax(nn.Module):
    """softmax(logits / T) over the last dimension."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.softmax(logits / self.temperature)


def _layers(config: XLoraConfig, width_out: int, device, dtype) -> list[nn.Module]:
    """Linear (+ ReLU, dropout) stack; built in HF PEFT's order so that a seed gives the same weights."""
    def linear(n_in: int, n_out: int) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=True).to(device).to(dtype)

    if config.xlora_depth == 1:
        return [linear(config.hidden_size, width_out)]
    layers: list[nn.Module] = []
    width_in = config.hidden_size
    for _ in range(config.xlora_depth - 1):
        layers += [linear(width_in, config.xlora_size), nn.ReLU()]
        if config.xlora_dropout_p > 0.0:
            layers.append(nn.Dropout(p=config.xlora_dropout_p))
        width_in = config.xlora_size
    return [*layers, linear(width_in, width_out)]


class XLoraClassifier(nn.Module):
    """Predicts the scalings of `n_classes` experts at each of `n_layers` LoRA layers."""

    def __init__(self, model: nn.Module, config: XLoraConfig, n_classes: int, n_layers: int,
                 device: torch.device | None) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.n_layers = n_layers
        self.config = config
        self.log_scalings: list[torch.Tensor] = []
        self.softmax = TemperatureScaledSoftmax(temperature=config.softmax_temperature)
        self.override_scaling_pass_value: float = config.scaling_pass_value
        self.scalings_logging = False
        self.dtype = next(model.parameters()).dtype
        width_out = n_classes * n_layers if config.layerwise_scalings else n_classes
        self.layers = nn.Sequential(*_layers(config, width_out, device, self.dtype))

    @staticmethod
    def _batch_shape(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("X-LoRA needs input_ids or inputs_embeds to size its scalings.")
        return source.shape[0], source.shape[1], source.device

    def make_dummy_scalings(self, input_ids: torch.Tensor | None = None,
                            inputs_embeds: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        """Scalings of the scaling pass: every entry `override_scaling_pass_value`,
        (batch, seq, n_layers, n_classes)."""
        batch, seq, device = self._batch_shape(input_ids, inputs_embeds)
        return torch.full((batch, seq, self.n_layers, self.n_classes), self.override_scaling_pass_value
                          ).to(device=device, dtype=self.dtype)

    def forward(self, result, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        """Scalings (batch, seq, n_layers, n_classes) from the scaling pass's output `result`."""
        batch, seq, _ = self._batch_shape(input_ids, inputs_embeds)
        logits = self.layers(result.hidden_states[-1])  # (batch, seq, width_out)
        if not self.config.layerwise_scalings:  # one set for all layers: broadcast
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
        if self.config.enable_softmax:
            scalings = self.softmax(scalings)
        if self.scalings_logging:
            self.log_scalings.append(scalings)
        return scalings

    def _get_bucketed_scalings(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: {seq_len: (positions in the log, scalings)}."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, scalings in enumerate(self.log_scalings):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(i)
            tensors.append(scalings)
        return buckets

    def _set_override_scaling_pass_value(self, value: float | None) -> None:
        """None: 1 / n_classes (every expert weighted equally in the scaling pass)."""
        self.override_scaling_pass_value = 1 / self.n_classes if value is None else value
        self.config.scaling_pass_value = self.override_scaling_pass_value
