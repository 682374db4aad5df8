"""The cartridge encoder: the key/value rows themselves, (n, 2 * layers * dim), as parameters.

Rows are laid out like prefix tuning's (per virtual token: [layer][key|value][head][head_dim], `token_dim`
counting KV heads under grouped-query attention) and served through the same cache. The first
`num_frozen_tokens` rows live in their own parameter that never takes gradients (the attention sink,
Eyuboglu et al., 2025, sec. 4); files hold all n rows as one `prompt_embeddings` tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from .._shared.kv_prefix import KVPrefixPrompt


class _Rows:
    """`encoder.embedding.weight`: the (n, features) rows, as code written for table encoders reads them."""

    def __init__(self, encoder: CartridgeEncoder) -> None:
        self._encoder = encoder

    @property
    def weight(self) -> torch.Tensor:
        return self._encoder.weight


class CartridgeEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        n, frozen = config.num_virtual_tokens, config.num_frozen_tokens
        if not 0 <= frozen <= n:
            raise ValueError(f"num_frozen_tokens must be in [0, num_virtual_tokens={n}], got {frozen}.")
        features = config.num_layers * 2 * config.token_dim
        self.num_frozen_tokens = frozen
        self.num_trainable_tokens = n - frozen
        self.frozen_embedding = (nn.Parameter(torch.empty(frozen, features), requires_grad=False)
                                 if frozen else None)
        self.trainable_embedding = nn.Parameter(torch.empty(n - frozen, features),
                                                requires_grad=not config.inference_mode)
        self.reset_parameters()

    @property
    def embedding(self) -> _Rows:
        return _Rows(self)

    @property
    def weight(self) -> torch.Tensor:
        """All n rows: the frozen ones first."""
        if self.frozen_embedding is None:
            return self.trainable_embedding
        return torch.cat([self.frozen_embedding, self.trainable_embedding], dim=0)

    def reset_parameters(self) -> None:
        # N(0, 1), as an nn.Embedding table starts (the paper's random initialisation)
        with torch.no_grad():
            if self.frozen_embedding is not None:
                nn.init.normal_(self.frozen_embedding)
            nn.init.normal_(self.trainable_embedding)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Write all n rows (a file's `prompt_embeddings`, or a prefill's cache): frozen ones first."""
        n = self.num_frozen_tokens + self.num_trainable_tokens
        expected = (n, self.trainable_embedding.shape[1])
        if tuple(prompt_embeddings.shape) != expected:
            raise ValueError(
                f"Invalid prompt_embeddings shape: expected {expected} (num_virtual_tokens, 2 * num_layers * "
                f"token_dim), got {tuple(prompt_embeddings.shape)}: the rows were made for another base "
                "model or another num_virtual_tokens.")
        with torch.no_grad():
            for part, rows in ((self.frozen_embedding, prompt_embeddings[:self.num_frozen_tokens]),
                               (self.trainable_embedding, prompt_embeddings[self.num_frozen_tokens:])):
                if part is not None:
                    part.copy_(rows.to(device=part.device, dtype=part.dtype))

    def forward(self, prefix_tokens: torch.Tensor) -> torch.Tensor:
        # the ids only give the batch size: every row of the batch gets the same cartridge
        return self.weight.unsqueeze(0).expand(prefix_tokens.shape[0], -1, -1)


class Cartridge(KVPrefixPrompt):
    def build_encoder(self, config, word_embeddings):
        return CartridgeEncoder(config)

    def encoder_output(self, encoder, config, rows, task_ids=None):
        return encoder(rows)  # the parameters are the rows, trained or loaded alike

    def after_activation(self, encoder):
        if encoder.frozen_embedding is not None:
            encoder.frozen_embedding.requires_grad_(False)

    def load_file_state(self, encoder, config, tensors):
        encoder.load_prompt_embeddings(tensors["prompt_embeddings"])
