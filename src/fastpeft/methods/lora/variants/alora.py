"""Activated LoRA (aLoRA, `LoraConfig(alora_invocation_tokens=[...])`): the adapter is switched on by a
prompt.

Greenewald et al. 2025, "Activated LoRA: Fine-tuned LLMs for Intrinsics" (arXiv:2504.12397). An aLoRA adapter
changes a linear layer only on the tokens from the last occurrence of its invocation token sequence onwards;
every earlier token sees the base model, so the KV cache of the prefix is the base model's and can be shared.

How the pieces fit:
- per call, `call_context` (LoraModel's `Tuner.call_context` hook, run by `model_forward` / `model_generate`)
  finds each row's offset, counted from the END of the row: offset = length - start of the last invocation
  match (None: not found, the row uses the base model). The offsets travel to the layers through the generic
  `Tuner.forward_context` as {"alora_offsets": {adapter name: [offset of each row the adapter sees]}}.
- `Alora.contribution` adds the LoRA update on the last `offset` positions of each row of the current input
  (clipped to its length): the whole suffix at prefill, the new token in cached decoding steps.
Counting from the end makes left padding harmless. As in HF PEFT: linear layers only, no merging, no beam
search.
"""

from __future__ import annotations

import warnings

import torch

from .base import LoraVariant

OPTION = "alora_invocation_tokens"
CONTEXT_KEY = "alora_offsets"


# ---------------------------------------------------------------------------------------------- config checks
def invocation_tokens(config) -> list[int] | None:
    """The adapter's invocation sequence, or None for a plain LoRA adapter (an empty list is off, as in HF
    PEFT)."""
    tokens = getattr(config, OPTION, None)
    return list(tokens) if tokens else None


def check_config(config, refuse_combinations) -> None:
    """Validate `alora_invocation_tokens` and refuse what aLoRA cannot be combined with: the LoraConfig check
    that table.py registers, with its `refuse_combinations(config)` (no other variant, no target_parameters).
    """
    tokens = getattr(config, OPTION, None)
    if not tokens:
        return
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in tokens):
        raise ValueError(f"alora_invocation_tokens must be a list of token ids (ints >= 0), got {tokens!r}; "
                         "use tokenizer.encode(invocation_string, add_special_tokens=False).")
    refuse_combinations(config)
    if getattr(config, "task_type", None) != "CAUSAL_LM":
        warnings.warn("aLoRA is meant for task_type='CAUSAL_LM'. fastpeft finds the invocation tokens in "
                      "input_ids for any task; HF PEFT only for CAUSAL_LM models (elsewhere its aLoRA "
                      "adapter stays off unless alora_offsets are passed).", UserWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------- the variant
class Alora(LoraVariant):
    """aLoRA on a linear layer (incl. Conv1D): base(x) + s B A x on activated tokens, base(x) elsewhere."""

    def contribution(self, layer, name, x, result):
        a = layer.lora_weights(name)[0]
        x = layer.cast_input(x, a.dtype)
        if x.dim() not in (2, 3):
            raise ValueError("aLoRA expects inputs of shape (batch, features) or (batch, tokens, features); "
                             f"got {tuple(x.shape)} at a layer of adapter '{name}'.")
        rows, steps = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        counts = active_counts(layer_offsets(layer, name), rows, steps)
        if steps and all(c == steps for c in counts):  # every token active (e.g. a cached decoding step)
            return layer.lora_path(name, layer.lora_dropout[name](x))
        picked = picked_tokens(layer, name, counts, steps, x.device)
        flat = x.reshape(rows * steps, x.shape[-1])
        # only activated tokens go through A and B (the others would get exactly zero); with none active this
        # still runs on an empty selection, so the adapter gets zero gradients rather than none (as HF PEFT)
        out = layer.lora_path(name, layer.lora_dropout[name](flat[picked]))
        full = out.new_zeros(rows * steps, out.shape[-1]).index_copy(0, picked, out)
        return full.reshape(*x.shape[:-1], out.shape[-1])

    def merged_weight(self, layer, name):
        raise NotImplementedError(
            f"Adapter '{name}' is an aLoRA adapter (alora_invocation_tokens): it acts only on tokens after "
            "the invocation sequence, which no merged weight can express, so it cannot be merged (as in HF "
            "PEFT). Keep it unmerged, or use unload() to remove it.")

    def unmerged_weight(self, layer, name):
        return self.merged_weight(layer, name)


def layer_offsets(layer, name: str) -> list[int | None] | None:
    """The offsets the current call handed to this layer for adapter `name` (None: no call context)."""
    context = getattr(layer, "forward_context", None) or {}
    return (context.get(CONTEXT_KEY) or {}).get(name)


def active_counts(offsets: list[int | None] | None, rows: int, steps: int) -> list[int]:
    """How many trailing positions of each row the adapter acts on: offsets clipped to the input's length."""
    if offsets is None:  # no offsets for this call: the adapter is off (as HF PEFT)
        return [0] * rows
    if len(offsets) != rows:
        raise ValueError(
            f"aLoRA got {len(offsets)} offsets for a batch of {rows} rows; pass one alora_offsets "
            "entry per row of input_ids (None for rows without the invocation sequence).")
    return [0 if o is None else max(0, min(int(o), steps)) for o in offsets]


def picked_tokens(layer, name: str, counts: list[int], steps: int, device) -> torch.Tensor:
    """Flat indices (row * steps + position) of the activated tokens; shared by all layers of one call."""
    cache = (getattr(layer, "forward_context", None) or {}).get(CONTEXT_KEY + "_picked")
    key = (name, steps, tuple(counts), str(device))
    if cache is not None and key in cache:
        return cache[key]
    start = torch.tensor([steps - c for c in counts], device=device).unsqueeze(1)  # (rows, 1)
    picked = (torch.arange(steps, device=device).unsqueeze(0) >= start).reshape(-1).nonzero().squeeze(1)
    if cache is not None:
        cache[key] = picked
    return picked


# ---------------------------------------------------------------------------------------------- offsets
def find_offsets(input_ids: torch.Tensor, tokens: list[int]) -> list[int | None]:
    """Per row: length - start of the last occurrence of `tokens` in input_ids (batch, length); None if
    absent."""
    length, k = input_ids.shape[-1], len(tokens)
    if length < k:
        return [None] * input_ids.shape[0]
    windows = input_ids.unfold(1, k, 1)  # (batch, length - k + 1, k)
    hits = (windows == torch.tensor(tokens, device=input_ids.device, dtype=input_ids.dtype)).all(-1)
    starts = torch.arange(hits.shape[1], device=input_ids.device)
    last = torch.where(hits, starts, -1).max(1).values.tolist()
    return [None if s < 0 else length - s for s in last]


def _rows_per_adapter(tuner, rows: int, adapter_names: list[str] | None) -> dict[str, list[int]]:
    """aLoRA adapter -> the batch rows it runs on (all rows for active adapters; by adapter_names if
    given)."""
    if adapter_names is None:
        names = [n for n in tuner.active_adapters if invocation_tokens(tuner.peft_config.get(n))]
        return {n: list(range(rows)) for n in names}
    out: dict[str, list[int]] = {}
    for i, n in enumerate(adapter_names):
        if n in tuner.peft_config and invocation_tokens(tuner.peft_config[n]):
            out.setdefault(n, []).append(i)
    return out


def _input_ids(args, kwargs) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is not None and ids.dim() == 1:
        ids = ids.unsqueeze(0)
    return ids


def call_context(tuner, args, kwargs: dict, adapter_names: list[str] | None, copies: int = 1) -> dict:
    """LoraModel's per-call context: each aLoRA adapter's offsets for the rows it sees ({} if none is in use).

    Pops `alora_offsets` (explicit per-row offsets, as HF PEFT accepts) from kwargs. `copies`: rows generate
    makes of each input row (num_return_sequences); adapter_names, if given, is already expanded by it.
    """
    explicit = kwargs.pop(CONTEXT_KEY, None)
    ids = _input_ids(args, kwargs)
    rows = (len(adapter_names) if adapter_names is not None
            else (None if ids is None else ids.shape[0] * copies))
    if rows is None:
        rows = len(explicit) * copies if explicit is not None else 0
    per_adapter = _rows_per_adapter(tuner, rows, adapter_names)
    if not per_adapter:
        return {}
    _refuse_unsupported_call(tuner, kwargs)
    if explicit is not None:
        full = [o for o in explicit for _ in range(copies)]
        return _context({n: [full[i] for i in idx] for n, idx in per_adapter.items()})
    if ids is None:
        warnings.warn("Cannot find aLoRA invocation tokens without input_ids (only inputs_embeds given): the "
                      "aLoRA adapters stay off for this call. Pass input_ids, or "
                      "alora_offsets=[...] per row.", UserWarning, stacklevel=3)
        return {CONTEXT_KEY: {}}
    ids = ids.repeat_interleave(copies, 0) if copies > 1 else ids
    if ids.shape[0] != rows:
        raise ValueError(f"adapter_names has {rows} entries but the batch has {ids.shape[0]} rows; pass one "
                         "adapter name per row of input_ids.")
    return _context({n: _adapter_offsets(tuner, n, ids[idx]) for n, idx in per_adapter.items()})


def _context(offsets: dict[str, list[int | None]]) -> dict:
    # the second: token indices, filled by the layers
    return {CONTEXT_KEY: offsets, CONTEXT_KEY + "_picked": {}}


def _adapter_offsets(tuner, name: str, ids: torch.Tensor) -> list[int | None]:
    offsets = find_offsets(ids, invocation_tokens(tuner.peft_config[name]))
    missing = [i for i, o in enumerate(offsets) if o is None]
    if missing:  # HF PEFT says nothing here; the row silently runs as the base model
        warnings.warn(f"aLoRA adapter '{name}': invocation tokens "
                      f"{invocation_tokens(tuner.peft_config[name])} not found in {len(missing)} of its "
                      f"{len(offsets)} rows; those rows use the base model.", UserWarning, stacklevel=4)
    return offsets


def _refuse_unsupported_call(tuner, kwargs: dict) -> None:
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        raise ValueError("Beam search (num_beams > 1) is not supported with aLoRA adapters (as in HF PEFT); "
                         "use greedy or sampling generation.")
    if not (tuner.model.training and torch.is_grad_enabled()):
        return
    if any(getattr(m, "gradient_checkpointing", False) is True for m in tuner.model.modules()):
        raise NotImplementedError(
            "aLoRA with gradient checkpointing is not supported by fastpeft yet: the recomputed forward in "
            "backward would not see the invocation offsets. Disable gradient checkpointing (model."
            "gradient_checkpointing_disable()) to train an aLoRA adapter.")
