"""generate() of every prompt method x task x base against an independent greedy reference
(greedy_reference.py).

The reference decodes by full forwards of the same model, honouring what generate honours (decoder start,
forced BOS / EOS, eos stopping and padding, left padding); beams are checked by rescoring each returned
sequence.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import fastpeft

from greedy_reference import generation_rules, greedy_reference, sequence_score
from prompt_helpers import (
    GEN_BASES,
    adapted,
    make_config,
    perturb,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
SHARED = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection", "multitask"]
CASES = ([(b, m) for b in ("llama", "gpt2") for m in [*SHARED, "cpt", "adaption_prompt"]]
         + [(b, m) for b in ("t5", "bart") for m in SHARED])


def batch(base_name):
    """Two rows with padding: causal rows left-padded with 0 (passed as pad_token_id), encoder rows
    right-padded."""
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(17))
    mask = torch.ones_like(ids)
    if GEN_BASES[base_name][1] == "CAUSAL_LM":
        ids[0, :2], mask[0, :2] = 0, 0
        return ids, mask, {"pad_token_id": 0}
    pad = GEN_BASES[base_name][0]().generation_config.pad_token_id
    ids[1, -2:], mask[1, -2:] = pad, 0
    return ids, mask, {}


def early_eos(out, offset, pad):
    """(row, step, token): a token one row emits at step >= 1 for the first time, which the other row has not
    emitted up to that step; made the eos, it stops that row while the other one goes on (so padding
    shows)."""
    new = out[:, offset:].tolist()
    for step in range(1, STEPS - 1):
        for row in (0, 1):
            token = new[row][step]
            if token != pad and token not in new[row][:step] and token not in new[1 - row][: step + 1]:
                return row, step, token
    raise AssertionError(f"no token of {new} can stop one row early: pick another seed")


@pytest.mark.parametrize(("base_name", "method"), CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_greedy_generate_equals_reference(base_name, method):
    model, call = adapted(base_name, method)
    ids, mask, settings = batch(base_name)
    rows = call or None  # per-row forward keywords for the reference (task_ids)

    def generate_and_check(**extra):
        kw = {**settings, **extra}
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS,
                             do_sample=False, **call, **kw)
        expected = greedy_reference(model, ids, mask, max_new_tokens=STEPS, row_kwargs=rows, **kw)
        assert torch.equal(got, expected), f"generate {got.tolist()} != reference {expected.tolist()}"
        return got

    plain = generate_and_check()
    with model.disable_adapter():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS,
                              do_sample=False, **settings)
    assert not torch.equal(base, plain), (
        "the adapter does not change the generation: the check would be vacuous")

    rules = generation_rules(model, **settings)
    offset = 1 if rules.seq2seq else ids.shape[1]
    row, step, eos = early_eos(plain, offset, rules.pad)
    stopped = generate_and_check(eos_token_id=eos, forced_eos_token_id=eos)
    end = offset + step + 1
    assert stopped[row, end - 1] == eos and stopped.shape[1] > end, stopped.tolist()
    assert (stopped[row, end:] == rules.pad).all(), (
        f"row {row} is not padded after its eos: {stopped.tolist()}")


BEAM_CASES = [("bart", "prefix"), ("bart", "prefix_projection"), ("bart", "prompt_tuning"), ("t5", "prefix"),
              ("llama", "prefix"), ("llama", "p_tuning_lstm"), ("gpt2", "prefix_projection")]


@pytest.mark.parametrize(("base_name", "method"), BEAM_CASES, ids=[f"{b}-{m}" for b, m in BEAM_CASES])
def test_beam_sequences_rescore_to_their_scores(base_name, method):
    """Every returned beam is rescored by full forwards: with length_penalty=0 its score is its
    log-probability, so a sequence decoded against a misplaced prefix or start token scores differently."""
    model, call = adapted(base_name, method)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(5))
    beams, settings = 3, ({} if GEN_BASES[base_name][1] == "SEQ_2_SEQ_LM" else {"pad_token_id": 0})
    out = model.generate(input_ids=ids, max_new_tokens=5, num_beams=beams, num_return_sequences=beams,
                         length_penalty=0.0, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **call, **settings)
    rules = generation_rules(model, **settings)
    if rules.seq2seq:  # bart: decoder start 2 then the forced bos 0, on every beam
        assert (out.sequences[:, 0] == rules.start).all(), out.sequences.tolist()
        if rules.forced_bos is not None:
            assert (out.sequences[:, 1] == rules.forced_bos).all(), out.sequences.tolist()
    else:
        assert torch.equal(out.sequences[:, : ids.shape[1]], ids.repeat_interleave(beams, 0))
    for j, sequence in enumerate(out.sequences):
        score = sequence_score(model, ids, sequence, j // beams, max_new_tokens=5, **settings)
        assert abs(score - float(out.sequences_scores[j])) < 1e-3, (j, score, out.sequences_scores.tolist())


class Recorder(LogitsProcessor):
    """Keeps the sequences generate() shows its logits processors."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


PROCESSOR_CASES = [("llama", "prompt_tuning"), ("llama", "prefix"), ("gpt2", "cpt"), ("t5", "prefix"),
                   ("bart", "prefix"), ("bart", "p_tuning_mlp")]


@pytest.mark.parametrize(("base_name", "method"), PROCESSOR_CASES,
                         ids=[f"{b}-{m}" for b, m in PROCESSOR_CASES])
def test_logits_processors_see_the_callers_sequence(base_name, method):
    """Repetition penalties, n-gram bans, forced BOS etc. read the running sequence: it must be the caller's
    ids (causal) or the decoder start (encoder-decoder), not virtual-token placeholders nor the new tokens
    alone."""
    model, call = adapted(base_name, method)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(8))
    recorder = Recorder()
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([recorder]), **call)
    start = out.shape[1] - 3
    assert [s.shape[1] for s in recorder.seen] == [start, start + 1, start + 2]
    for k, seen in enumerate(recorder.seen):
        assert torch.equal(seen, out[:, : start + k]), (k, seen.tolist(), out.tolist())
    if GEN_BASES[base_name][1] == "CAUSAL_LM":
        assert torch.equal(recorder.seen[0], ids)



@pytest.mark.parametrize(("base_name", "method"),
                         [("llama", "prefix"), ("bart", "prefix"), ("llama", "prompt_tuning")])
def test_generate_without_cache_equals_reference(base_name, method):
    """use_cache=False only trades speed for memory: the tokens stay those of the reference."""
    model, call = adapted(base_name, method)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(5))
    got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False,
                         pad_token_id=0, **call)
    assert torch.equal(got, greedy_reference(model, ids, max_new_tokens=4, pad_token_id=0))

def _tiny_encoder_decoder(config_cls, model_cls, special: dict, forced: dict):
    config = config_cls(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, init_std=1.0, **special)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(**special, **forced)
    return model


def _marian():
    from transformers import MarianConfig, MarianMTModel

    # opus-mt's layout: the decoder starts with pad (the last id) and eos is 0, the id a placeholder would
    # take
    return _tiny_encoder_decoder(MarianConfig, MarianMTModel, {"pad_token_id": 99, "eos_token_id": 0,
                                                               "decoder_start_token_id": 99}, {})


def _mbart():
    from transformers import MBartConfig, MBartForConditionalGeneration

    # mbart-large-50's layout: start with eos (2), then a forced target-language token
    special = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
    return _tiny_encoder_decoder(MBartConfig, MBartForConditionalGeneration, special,
                                 {"forced_bos_token_id": 7, "forced_eos_token_id": 2})


@pytest.mark.parametrize("make", [_marian, _mbart], ids=["marian", "mbart"])
def test_prefix_generate_on_other_encoder_decoders(make):
    """The fix is not BART's alone: any decoder start token and forcing rule, greedy and with beams."""
    model = fastpeft.get_peft_model(make(), make_config(fastpeft, "prefix", "SEQ_2_SEQ_LM"))
    perturb(model, 3)
    model.eval()
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(6))
    got = model.generate(input_ids=ids, max_new_tokens=STEPS, do_sample=False)
    expected = greedy_reference(model, ids, max_new_tokens=STEPS)
    assert torch.equal(got, expected), f"generate {got.tolist()} != reference {expected.tolist()}"
    out = model.generate(input_ids=ids, max_new_tokens=4, num_beams=3, num_return_sequences=3,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    for j, sequence in enumerate(out.sequences):
        score = sequence_score(model, ids, sequence, j // 3, max_new_tokens=4)
        assert abs(score - float(out.sequences_scores[j])) < 1e-3, (j, score, out.sequences_scores.tolist())
