"""Soft-prompt generate: greedy / sampling / beams / left padding vs greedy decoding by forward()
(greedy_reference).

HF PEFT 0.21's own prompt generate() is broken with transformers 5.2x (spec section 5), hence the reference.
"""

from __future__ import annotations

import json

import peft  # noqa: E402
import pytest
import torch

import fastpeft  # noqa: E402

import models
from greedy_reference import greedy_reference
from prompt_helpers import (
    BASES,
    MAIN_METHODS,
    _prompt_ids,
    assert_close,
    fp_adapter,
    hf_adapter,
    make_config,
    make_t5_for_generation,
    outputs,
    perturb,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 2. generate
# ----------------------------------------------------------------------------------------------


CAUSAL_GEN = [(b, m) for b in ("llama", "gpt2") for m in MAIN_METHODS]
CAUSAL_GEN_IDS = [f"{b}-{m}" for b, m in CAUSAL_GEN]




@pytest.mark.parametrize(("base_name", "method"), CAUSAL_GEN, ids=CAUSAL_GEN_IDS)
def test_causal_greedy_generate_equals_manual_loop(base_name, method):
    model = fp_adapter(base_name, method, seed=3)
    ids = _prompt_ids(5)
    mask = torch.ones_like(ids)
    expected = greedy_reference(model, ids, mask, max_new_tokens=6)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert got.shape == (2, 11)
    assert torch.equal(got, expected), f"generate {got.tolist()} != manual {expected.tolist()}"
    # the prompt is really used by generate: the base model continues differently
    base = BASES[base_name][0]()
    assert not torch.equal(greedy_reference(base, ids, mask, max_new_tokens=6), expected)


@pytest.mark.parametrize(("base_name", "method"), [("llama", "p_tuning_lstm"), ("llama", "prefix_projection"),
                                                    ("gpt2", "prompt_tuning"), ("gpt2", "prefix")])
def test_generate_of_loaded_hf_adapter_follows_hf_forward(base_name, method, tmp_path):
    """fastpeft generate (inference layout, HF file) == a greedy loop over HF PEFT's own forward."""
    hf_model = hf_adapter(base_name, method, seed=9)
    hf_model.save_pretrained(tmp_path)
    model = fastpeft.PeftModel.from_pretrained(BASES[base_name][0](), tmp_path)
    ids = _prompt_ids(15, (2, 5))
    mask = torch.ones_like(ids)
    expected = greedy_reference(hf_model, ids, mask, max_new_tokens=5)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                       expected)


@pytest.mark.parametrize(("base_name", "method"), CAUSAL_GEN, ids=CAUSAL_GEN_IDS)
def test_causal_generate_left_padding_equals_rows_alone(base_name, method):
    model = fp_adapter(base_name, method, seed=3)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    batch = model.generate(input_ids=ids, attention_mask=mask, **kw)
    alone0 = model.generate(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:], **kw)
    alone1 = model.generate(input_ids=ids[1:], attention_mask=mask[1:], **kw)
    assert torch.equal(batch[0, 2:], alone0[0]), (batch.tolist(), alone0.tolist())
    assert torch.equal(batch[1], alone1[0]), (batch.tolist(), alone1.tolist())
    # and the unpadded row also equals the manual loop
    assert torch.equal(alone1, greedy_reference(model, ids[1:], mask[1:], max_new_tokens=6, pad_token_id=0))


def _t5_gen_model(method, seed=3):
    model = fastpeft.get_peft_model(make_t5_for_generation(), make_config(fastpeft, method, "SEQ_2_SEQ_LM"))
    perturb(model, seed)
    return model.eval()


@pytest.mark.parametrize("method", MAIN_METHODS)
def test_seq2seq_greedy_generate_equals_manual_loop(method):
    model = _t5_gen_model(method)
    ids = _prompt_ids(7, (3, 5))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0  # a right-padded encoder row
    expected = greedy_reference(model, ids, mask, max_new_tokens=6)
    assert len(set(expected[:, 1:].flatten().tolist())) > 1, "degenerate generation: every token the same"
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected), f"generate {got.tolist()} != manual {expected.tolist()}"
    alone = model.generate(input_ids=ids[2:, :3], attention_mask=mask[2:, :3], max_new_tokens=6,
                           do_sample=False)
    assert torch.equal(alone[0], got[2])


SEQ2SEQ_HF_GEN = [("prompt_tuning", {"max_new_tokens": 5}), ("p_tuning_mlp", {"max_new_tokens": 5}),
                  ("p_tuning_lstm", {"max_new_tokens": 5}),
                  # max_length counts decoder tokens for encoder-decoders (decoder start + 4 new ones)
                  ("prompt_tuning", {"max_length": 5}),
                  ("p_tuning_mlp", {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2})]


@pytest.mark.parametrize(("method", "kw"), SEQ2SEQ_HF_GEN,
                         ids=[f"{m}-{'-'.join(k)}" for m, k in SEQ2SEQ_HF_GEN])
def test_seq2seq_generate_matches_hf(method, kw, tmp_path):
    """HF PEFT's seq2seq generate works in this environment for the embedding methods (spec 5.2)."""
    model = _t5_gen_model(method)
    model.save_pretrained(tmp_path)
    hf_model = peft.PeftModel.from_pretrained(make_t5_for_generation(), tmp_path).eval()
    ids = _prompt_ids(8, (3, 5))
    mask = torch.ones_like(ids)
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    got = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())


CALL_VARIANTS = [("llama", "prompt_tuning"), ("llama", "p_tuning_lstm"), ("llama", "prefix"),
                 ("t5", "prompt_tuning"), ("t5", "prefix")]


@pytest.mark.parametrize(("base_name", "method"), CALL_VARIANTS, ids=[f"{b}-{m}" for b, m in CALL_VARIANTS])
def test_generate_call_variants_agree(base_name, method):
    """Positional input_ids, max_length and return_dict_in_generate give the same greedy tokens."""
    model = fp_adapter(base_name, method, seed=3)
    ids = _prompt_ids(13, (2, 5))
    reference = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    # causal: max_length counts the prompt; encoder-decoder: the decoder tokens (start token + new ones)
    length = 9 if base_name == "llama" else 5
    assert reference.shape == (2, length)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), reference)
    assert torch.equal(model.generate(input_ids=ids, max_length=length, do_sample=False), reference)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_scores=True)
    assert torch.equal(out.sequences, reference) and len(out.scores) == 4


SEVERAL = [("llama", "prompt_tuning"), ("llama", "prefix"), ("gpt2", "prefix_projection"),
           ("t5", "prompt_tuning"), ("t5", "prefix")]


@pytest.mark.parametrize(("base_name", "method"), SEVERAL, ids=[f"{b}-{m}" for b, m in SEVERAL])
def test_generate_several_sequences_per_prompt(base_name, method):
    model = fp_adapter(base_name, method, seed=3)
    ids = _prompt_ids(14, (2, 5))
    causal = base_name != "t5"
    width = 9 if causal else 5  # causal rows keep their prompt; t5 rows are decoder start + 4
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, num_return_sequences=2,
                             pad_token_id=0)
    assert sampled.shape == (4, width)
    if causal:
        assert torch.equal(sampled[:, :5], ids.repeat_interleave(2, dim=0))
    best = model.generate(input_ids=ids, max_new_tokens=4, num_beams=3, pad_token_id=0)
    beams = model.generate(input_ids=ids, max_new_tokens=4, num_beams=3,
                           num_return_sequences=2, pad_token_id=0)
    assert beams.shape == (4, width)
    assert torch.equal(beams[::2], best)  # beams come best first


@pytest.mark.parametrize(("base_name", "method"), [("llama", "prompt_tuning"), ("llama", "prefix"),
                                                    ("gpt2", "p_tuning_lstm"), ("t5", "prompt_tuning"),
                                                    ("t5", "prefix_projection")])
def test_sampling_with_seed(base_name, method):
    model = fp_adapter(base_name, method, seed=4)
    ids = _prompt_ids(9, (2, 5))
    mask = torch.ones_like(ids)
    kw = {"max_new_tokens": 5, "do_sample": True, "top_k": 0, "pad_token_id": 0}
    torch.manual_seed(11)
    first = model.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(11)
    second = model.generate(input_ids=ids, attention_mask=mask, **kw)
    expected_len = 6 if base_name == "t5" else 10  # t5: decoder start + 5; causal: prompt + 5
    assert first.shape == (2, expected_len)
    assert torch.equal(first, second)
    assert first.min() >= 0 and first.max() < 100


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_auto_peft_model_for_causal_lm(method, tmp_path):
    from transformers import LlamaForCausalLM

    models.make_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = fastpeft.get_peft_model(base, make_config(fastpeft, method, "CAUSAL_LM"))
    perturb(model, 5)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tmp_path / "base")

    inputs = models.llama_inputs()
    loaded = fastpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, fastpeft.PeftModelForCausalLM)
    assert_close(outputs(loaded, inputs), outputs(model, inputs), "AutoPeftModelForCausalLM")
    ids = _prompt_ids(10, (1, 4))
    kw = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(loaded.generate(input_ids=ids, **kw), model.generate(input_ids=ids, **kw))

    hf_loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert_close(outputs(hf_loaded, inputs), outputs(model, inputs), "HF AutoPeftModelForCausalLM")


