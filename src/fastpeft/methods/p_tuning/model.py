"""P-tuning's `PromptEncoder`: embedding rows passed through an MLP (or a bidirectional LSTM, then an MLP)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.prompt import EmbeddingPrompt

logger = logging.getLogger(__name__)


def _mlp_head(config, dim: int, hidden: int) -> nn.Module:
    if config.encoder_num_layers != 2:
        logger.warning("encoder_num_layers=%s is ignored by the MLP encoder (it has 3 linear layers).",
                       config.encoder_num_layers)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dim))


class PromptEncoder(nn.Module):
    def __init__(self, config, rows: int) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.kind = getattr(config.encoder_reparameterization_type, "value",
                            config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(rows, dim)
        if config.inference_mode:  # loaded adapters hold the encoder's output: no head needed
            return
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = _mlp_head(config, dim, hidden)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)  # (batch, rows, dim)
        if self.kind == "LSTM":
            embeds = self.lstm_head(embeds)[0]  # (batch, rows, 2 * hidden)
        return self.mlp_head(embeds)


class PTuning(EmbeddingPrompt):
    def prepare_config(self, config, model):
        config = super().prepare_config(config, model)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return config

    def build_encoder(self, config, word_embeddings):
        return PromptEncoder(config, self.rows(config))
