"""Multitask prompt tuning's encoder (`MultitaskPromptEmbedding`) and its `PromptMethod`.

prompts = embedding * (prefix_task_cols[task] @ prefix_task_rows[task]); encoder-decoder models with
num_transformer_submodules=2 also get the second half of the rows in front of the decoder inputs (as HF PEFT).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ...core.prompt import EmbeddingPrompt, _extend_mask, _pad_left
from ..prompt_tuning.model import PromptEmbedding
from .config import SOURCE_INITS

FILE_KEYS = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def _init_name(config) -> str:
    return getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)


def _read_source(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a source-training adapter file (safetensors, else a torch file of plain tensors), read
    by fastpeft's checked reader: a forged header, pickled code or a truncated file raises a FastPeftError."""
    from ...checkpoint.io import load_weights_file
    from ...errors import AdapterFileNotFoundError, AdapterLoadError

    if not os.path.isfile(path):
        raise AdapterFileNotFoundError(
            f"prompt_tuning_init_state_dict_path {path!r} is not a file: point it at the "
            "adapter_model.safetensors of a MULTITASK_PROMPT_TUNING source training run.")
    tensors = load_weights_file(str(path))
    missing = [k for k in FILE_KEYS if k not in tensors]
    if missing:
        raise AdapterLoadError(
            f"prompt_tuning_init_state_dict_path {path!r} lacks {missing}: point it at the adapter weights "
            "saved from a MULTITASK_PROMPT_TUNING source training run."
        )
    return tensors


def _source_state(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder state one source init asks for (keys as in the encoder's own state_dict)."""
    init = _init_name(config)
    state = {"embedding.weight": tensors["prompt_embeddings"]}
    if init == "ONLY_SOURCE_SHARED":
        return state
    cols, rows = tensors["prefix_task_cols"], tensors["prefix_task_rows"]
    if init == "AVERAGE_SOURCE_TASKS":
        cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
    else:
        task = config.prompt_tuning_init_task
        if not 0 <= task < cols.shape[0]:
            raise ValueError(f"prompt_tuning_init_task={task} is out of range: the source file holds "
                             f"{cols.shape[0]} tasks.")
        cols, rows = cols[task : task + 1], rows[task : task + 1]
    state.update(prefix_task_cols=cols, prefix_task_rows=rows)
    return state


def _copy_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`'s parameters after checking every shape (nothing is written on a
    mismatch)."""
    params = dict(module.named_parameters())
    for key, value in state.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(
                f"{source}: '{key}' has shape {tuple(value.shape)} but the model expects "
                f"{tuple(params[key].shape)}. Match num_virtual_tokens / num_tasks / num_ranks to the source "
                "(AVERAGE_SOURCE_TASKS and EXACT_SOURCE_TASK give one task: use num_tasks=1)."
            )
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


class MultitaskPromptEmbedding(PromptEmbedding):
    """Shared virtual-token rows times a rank-`num_ranks` matrix per task."""

    def __init__(self, config, word_embeddings: nn.Module, rows: int) -> None:
        init = _init_name(config)
        base = config
        if init in SOURCE_INITS:  # the shared rows start random, then come from the source file
            base = copy.copy(config)
            base.prompt_tuning_init = "RANDOM"
        super().__init__(base, word_embeddings, rows)
        self.num_tasks, self.num_ranks = config.num_tasks, config.num_ranks
        self.prefix_task_cols = nn.Parameter(
            torch.normal(0.0, 0.02, size=(config.num_tasks, rows, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim)))
        # a loaded adapter overwrites everything anyway
        if init in SOURCE_INITS and not config.inference_mode:
            self._init_from_source(config)

    def _init_from_source(self, config) -> None:
        path = config.prompt_tuning_init_state_dict_path
        if path is None:
            raise ValueError(
                f"prompt_tuning_init={_init_name(config)} needs prompt_tuning_init_state_dict_path "
                "(the adapter weights of a source training run).")
        state = _source_state(config, _read_source(path))
        _copy_checked(self, state, f"prompt_tuning_init_state_dict_path {path!r}")

    def forward(self, indices: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("MULTITASK_PROMPT_TUNING needs task_ids: pass task_ids=<LongTensor of shape "
                             "(batch,)> to the forward / generate call.")
        scale = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]
        return self.embedding(indices) * scale


class MultitaskPromptTuning(EmbeddingPrompt):
    file_keys = FILE_KEYS

    def build_encoder(self, config, word_embeddings):
        return MultitaskPromptEmbedding(config, word_embeddings, self.rows(config))

    def encoder_output(self, encoder, config, rows, task_ids=None):
        """The task-scaled prompts, in training and inference mode alike (file weights are the raw parts)."""
        return encoder(rows, _task_tensor(task_ids, config, encoder.embedding.weight.device))

    def encode(self, encoder, config, batch_size, task_ids=None):
        prompts = getattr(self, "_prompts", None)  # set by transform for encoder-decoder inputs
        if prompts is None:
            prompts = super().encode(encoder, config, batch_size, task_ids)
        if prompts.shape[0] not in (1, batch_size):
            raise ValueError(f"task_ids holds {prompts.shape[0]} ids for a batch of {batch_size}: pass one "
                             "id per example (or a single id for the whole batch).")
        return prompts.expand(batch_size, -1, -1)

    # ------------------------------------------------------------------ files
    def file_state(self, encoder, config):
        return {
            "prompt_embeddings": encoder.embedding.weight.detach().cpu(),
            "prefix_task_cols": encoder.prefix_task_cols.detach().cpu(),
            "prefix_task_rows": encoder.prefix_task_rows.detach().cpu(),
        }

    def load_file_state(self, encoder, config, tensors):
        state = {"embedding.weight": tensors["prompt_embeddings"],
                 "prefix_task_cols": tensors["prefix_task_cols"],
                 "prefix_task_rows": tensors["prefix_task_rows"]}
        _copy_checked(encoder, state, "The adapter file (made for another base model or config?)")

    # ------------------------------------------------------------------ inputs
    def transform(self, encoder, config, model, word_embeddings, kwargs):
        if not _decoder_side(config, kwargs):  # generate and decoder-only tasks: the shared recipe
            return super().transform(encoder, config, model, word_embeddings, kwargs)
        kwargs = dict(kwargs)
        decoder = {k: kwargs.pop(k, None) for k in DECODER_KEYS}
        labels = kwargs.pop("labels", None)
        prompts = self.encode(encoder, config, _batch_size(kwargs), kwargs.get("task_ids"))
        self._prompts = prompts  # computed once: the first n rows go to the encoder, the rest to the decoder
        try:
            out = super().transform(encoder, config, model, word_embeddings, kwargs)
        finally:
            self._prompts = None
        n = config.num_virtual_tokens
        dec = _decoder_embeds(model, word_embeddings, labels, decoder)
        out["decoder_inputs_embeds"] = torch.cat([prompts[:, n:].to(dec.dtype), dec], dim=1)
        out["decoder_attention_mask"] = _extend_mask(decoder["decoder_attention_mask"], n)
        out["labels"] = _pad_left(labels, n, -100)
        return {k: v for k, v in out.items() if v is not None}


def _decoder_side(config, kwargs) -> bool:
    """Whether the call feeds an encoder-decoder's decoder and the prompt has decoder rows (S == 2)."""
    if config.task_type != "SEQ_2_SEQ_LM" or config.num_transformer_submodules != 2:
        return False
    return any(kwargs.get(k) is not None for k in ("labels", "decoder_input_ids", "decoder_inputs_embeds"))


def _batch_size(kwargs) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("Pass input_ids or inputs_embeds to the model.")


def _task_tensor(task_ids, config, device: torch.device) -> torch.Tensor | None:
    """task_ids as a 1-D long tensor, checked against num_tasks."""
    if task_ids is None:
        return None
    ids = torch.as_tensor(task_ids, device=device)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() > 1:
        raise ValueError(f"task_ids must be integer task indices of shape (batch,), got dtype {ids.dtype} "
                         f"and shape {tuple(ids.shape)}.")
    ids = ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_tasks):
        raise ValueError(f"task_ids must lie in [0, {config.num_tasks}) (num_tasks={config.num_tasks}), got "
                         f"{ids.tolist()}.")
    return ids


def _decoder_embeds(model, word_embeddings, labels, decoder) -> torch.Tensor:
    """The decoder input embeddings the prompt rows go in front of (from labels, shifted right, if not
    given)."""
    if decoder["decoder_input_ids"] is not None:
        raise ValueError(
            "MULTITASK_PROMPT_TUNING on an encoder-decoder (num_transformer_submodules=2) puts prompt rows "
            "in front of the decoder inputs, so it takes labels (decoder inputs are derived from them) or "
            "decoder_inputs_embeds, not decoder_input_ids (HF PEFT fails on them too). Pass "
            "decoder_inputs_embeds=model.get_input_embeddings()(decoder_input_ids) instead."
        )
    if decoder["decoder_inputs_embeds"] is not None:
        return decoder["decoder_inputs_embeds"]
    return word_embeddings(_shift_right(labels, getattr(model, "config", None)))


def _shift_right(labels: torch.Tensor, model_config) -> torch.Tensor:
    start = getattr(model_config, "decoder_start_token_id", None)
    pad = getattr(model_config, "pad_token_id", None)
    if start is None or pad is None:
        raise ValueError("Deriving decoder inputs from labels needs decoder_start_token_id and pad_token_id "
                         "in the model config; set them, or pass decoder_inputs_embeds.")
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad)
