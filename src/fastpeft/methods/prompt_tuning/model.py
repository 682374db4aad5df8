"""Prompt tuning's encoder (`PromptEmbedding`) and its init schemes, as a table keyed by
`PromptTuningInit`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.prompt import EmbeddingPrompt


def _init_random(embedding: nn.Embedding, config, word_embeddings: nn.Module) -> None:
    """Keep nn.Embedding's N(0, 1) init."""


def _init_sample_vocab(embedding, config, word_embeddings) -> None:
    ids = torch.randint(0, word_embeddings.weight.shape[0], (embedding.weight.shape[0],))
    _copy_rows(embedding, word_embeddings, ids)


def _init_text(embedding, config, word_embeddings) -> None:
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    rows = embedding.weight.shape[0]
    ids = (ids * math.ceil(rows / max(len(ids), 1)))[:rows]  # repeat the text to fill every virtual token
    _copy_rows(embedding, word_embeddings, torch.tensor(ids))


def _copy_rows(embedding: nn.Embedding, word_embeddings: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone()
        embedding.weight.copy_(rows.to(torch.float32))


INITS = {"RANDOM": _init_random, "SAMPLE_VOCAB": _init_sample_vocab, "TEXT": _init_text}


class PromptEmbedding(nn.Module):
    """One trainable row per virtual token (and per transformer stack for encoder-decoders)."""

    def __init__(self, config, word_embeddings: nn.Module, rows: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, config.token_dim)
        init = getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)
        if not config.inference_mode:  # a loaded adapter overwrites the rows anyway
            INITS[init](self.embedding, config, word_embeddings)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PromptTuning(EmbeddingPrompt):
    def build_encoder(self, config, word_embeddings):
        return PromptEmbedding(config, word_embeddings, self.rows(config))
