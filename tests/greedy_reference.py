"""An independent reference for `generate`: full forwards of the same model (no cache), one input row at a
time.

It needs nothing from generate() or from HF PEFT's generate (broken on transformers 5). It follows the rules
transformers' generate applies to greedy search and beam scores, which are the contract a prompt method must
keep: the decoder start token, forced BOS when the sequence holds one token, forced EOS at the last step
(max_length), stopping at eos and padding finished rows with pad_token_id. Each row runs alone without its
padding: generate's promise for padded batches (left padding for decoder-only models) is that rows do not
change with padding. Settings this reference does not model are refused, so a test cannot pass by ignoring
them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

# generation settings that change greedy decoding but are not modelled here: they must keep these values
UNMODELLED = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_length": (None, 0),
              "min_new_tokens": (None,), "bad_words_ids": (None,), "suppress_tokens": (None,),
              "begin_suppress_tokens": (None,), "sequence_bias": (None,),
              "encoder_no_repeat_ngram_size": (None, 0),
              "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,)}


@dataclass(frozen=True)
class Rules:
    """What generate() honours beyond the argmax, read from the base model's generation config and the
    call."""

    seq2seq: bool
    eos: tuple[int, ...]
    pad: int | None
    start: int | None
    forced_bos: int | None
    forced_eos: int | None


def generation_rules(model, **overrides) -> Rules:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = copy.deepcopy(base.generation_config)
    settings.update(**{k: v for k, v in overrides.items() if v is not None})  # generate() ignores None too
    for name, allowed in UNMODELLED.items():
        assert getattr(settings, name, None) in allowed, f"greedy_reference does not model {name}"
    eos = settings.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    pad = settings.pad_token_id if settings.pad_token_id is not None else (eos[0] if eos else None)
    start = settings.decoder_start_token_id
    return Rules(seq2seq=bool(base.config.is_encoder_decoder), eos=eos, pad=pad,
                 start=settings.bos_token_id if start is None else start,
                 forced_bos=settings.forced_bos_token_id, forced_eos=settings.forced_eos_token_id)


def forced_token(rules: Rules, cur_len: int, last_step: bool) -> int | None:
    """The token a forcing rule imposes (forced EOS is applied after forced BOS, so it wins when both
    hold)."""
    if last_step and rules.forced_eos is not None:
        return rules.forced_eos
    if cur_len == 1 and rules.forced_bos is not None:
        return rules.forced_bos
    return None


def next_logits(model, prompt: torch.Tensor, seq: list[int], rules: Rules, extra: dict) -> torch.Tensor:
    """The last position's logits of one full forward over `seq` (the decoder side for encoder-decoders)."""
    seq_t = torch.tensor([seq], dtype=torch.long)
    with torch.no_grad():
        if rules.seq2seq:
            out = model(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                        decoder_input_ids=seq_t, **extra)
        else:
            out = model(input_ids=seq_t, attention_mask=torch.ones_like(seq_t), **extra)
    return out.logits[0, -1].float()


def _row_inputs(input_ids, attention_mask, i: int, row_kwargs: dict | None):
    mask = torch.ones_like(input_ids[i]) if attention_mask is None else attention_mask[i]
    extra = {k: v[i : i + 1] for k, v in (row_kwargs or {}).items()}
    return input_ids[i][mask.bool()], extra


def _greedy_row(model, prompt, extra: dict, rules: Rules, steps: int) -> list[int]:
    seq = [rules.start] if rules.seq2seq else prompt.tolist()
    new: list[int] = []
    for step in range(steps):
        token = forced_token(rules, len(seq), step == steps - 1)
        if token is None:
            token = int(next_logits(model, prompt, seq, rules, extra).argmax())
        seq.append(token)
        new.append(token)
        if token in rules.eos:
            break
    return new


def greedy_reference(model, input_ids, attention_mask=None, *, max_new_tokens: int, row_kwargs=None,
                     **overrides) -> torch.Tensor:
    """What `model.generate(input_ids, attention_mask, max_new_tokens=..., do_sample=False, **overrides)`
    returns.

    `row_kwargs`: per-row forward inputs such as task_ids (sliced per row). Causal rows keep their (padded)
    prompt in front, encoder-decoder rows start with the decoder start token, as generate() returns them.
    """
    rules = generation_rules(model, **overrides)
    rows = [_greedy_row(model, *_row_inputs(input_ids, attention_mask, i, row_kwargs), rules, max_new_tokens)
            for i in range(input_ids.shape[0])]
    width = max(len(r) for r in rows)
    if any(len(r) < width for r in rows):
        assert rules.pad is not None, "a row finished early but there is no pad_token_id to fill it with"
    new = torch.tensor([r + [rules.pad] * (width - len(r)) for r in rows], dtype=torch.long)
    head = torch.full((input_ids.shape[0], 1), rules.start) if rules.seq2seq else input_ids
    return torch.cat([head, new], dim=1)


def sequence_score(model, input_ids, sequence: torch.Tensor, i: int, *, max_new_tokens: int, row_kwargs=None,
                   **overrides) -> float:
    """Sum of the processed log-probabilities of one generated `sequence` for input row `i` (forced tokens:
    0).

    This is beam search's `sequences_scores` with length_penalty=0; generate's sequence is checked token by
    token against full forwards, so a misplaced prefix or start token shows up as a different score.
    """
    rules = generation_rules(model, **overrides)
    prompt, extra = _row_inputs(input_ids, None, i, row_kwargs)
    prompt_len = 1 if rules.seq2seq else input_ids.shape[1]
    if rules.seq2seq:
        assert int(sequence[0]) == rules.start, (
            f"sequence {sequence.tolist()} does not start with {rules.start}")
    seq, total = sequence[:prompt_len].tolist(), 0.0
    for step, token in enumerate(sequence[prompt_len:].tolist()):
        forced = forced_token(rules, len(seq), step == max_new_tokens - 1)
        if forced is None:
            total += float(torch.log_softmax(next_logits(model, prompt, seq, rules, extra), -1)[token])
        else:
            assert token == forced, f"step {step}: {token} generated where {forced} is forced"
        seq.append(token)
        if token in rules.eos:
            break
    return total
