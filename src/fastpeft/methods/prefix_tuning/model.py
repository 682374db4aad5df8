"""Prefix tuning: an encoder of (n, 2 * layers * dim) rows turned into a pre-filled key/value cache.

Each virtual token holds, per layer, a key and a value for every KV head. The model attends to them as if
they were n earlier tokens (Li & Liang, 2021, sec. 4.1). The cache rules are shared with other key/value
prefix methods: methods/_shared/kv_prefix.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .._shared.kv_prefix import KVPrefixPrompt, _legacy_positions, build_cache

__all__ = ["PrefixEncoder", "PrefixTuning", "_legacy_positions", "build_cache"]


class PrefixEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        n, dim, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.prefix_projection = config.prefix_projection
        self.projected = config.prefix_projection and not config.inference_mode
        if self.projected:
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(nn.Linear(dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, layers * 2 * dim))
        else:
            self.embedding = nn.Embedding(n, layers * 2 * dim)
        if config.init_weights == "zero":
            last = self.transform[2] if self.projected else self.embedding
            for param in last.parameters():
                nn.init.zeros_(param)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        return self.transform(embeds) if self.projected else embeds

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Write flattened key/value rows (n, 2 * layers * dim) into the table. With prefix_projection the
        table holds the MLP's inputs, which cannot be recovered from its outputs, so this is refused."""
        if self.prefix_projection:
            raise ValueError("Cannot load flattened key/value rows into a prefix encoder with "
                             "prefix_projection=True: its table holds the MLP's inputs. Use "
                             "prefix_projection=False.")
        weight = self.embedding.weight
        if tuple(prompt_embeddings.shape) != tuple(weight.shape):
            raise ValueError(f"Invalid prompt_embeddings shape: expected {tuple(weight.shape)}, got "
                             f"{tuple(prompt_embeddings.shape)}.")
        with torch.no_grad():
            weight.copy_(prompt_embeddings.to(device=weight.device, dtype=weight.dtype))


class PrefixTuning(KVPrefixPrompt):
    def prepare_config(self, config, model):
        config = super().prepare_config(config, model)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return config

    def build_encoder(self, config, word_embeddings):
        return PrefixEncoder(config)

    def load_kv_rows(self, encoder, config, rows):
        if config.prefix_projection:
            raise ValueError("Initialization from a key/value cache is not supported for prefix tuning with "
                             "prefix_projection=True (its rows come out of an MLP); use "
                             "prefix_projection=False.")
        super().load_kv_rows(encoder, config, rows)
