"""Soft-prompt methods vs HF PEFT: files, logits and losses both ways, and prompt-tuning init.

HF PEFT 0.21.2 is the oracle (docs/notes/prompt_methods_spec.md); every adapter is perturbed before comparing.
Shared bases and helpers: tests/prompt_helpers.py.
"""

from __future__ import annotations

import json
import math

import peft  # noqa: E402
import pytest
import torch
from safetensors.torch import load_file

import fastpeft  # noqa: E402

import models
from prompt_helpers import (
    ATOL,
    BASES,
    EMBEDDING_METHODS,
    MAIN_METHODS,
    ORACLE_CASES,
    ORACLE_IDS,
    N,
    _labelled,
    assert_changes_base,
    assert_close,
    bert_inputs_with_token_types,
    fp_adapter,
    hf_adapter,
    make_config,
    outputs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------
# 1. oracle, both directions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base_name", "method"), ORACLE_CASES, ids=ORACLE_IDS)
def test_hf_adapter_loads_in_fastpeft(base_name, method, tmp_path):
    make, inputs_fn, _ = BASES[base_name]
    inputs = inputs_fn()
    hf_model = hf_adapter(base_name, method)
    expected = outputs(hf_model, inputs)
    assert_changes_base(expected, outputs(make(), inputs), "HF PEFT vs base")
    hf_model.save_pretrained(tmp_path)

    fp_model = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    assert type(fp_model).__name__ == type(hf_model).__name__
    assert_close(outputs(fp_model, inputs), expected, "fastpeft(HF file) vs HF PEFT")


@pytest.mark.parametrize(("base_name", "method"), ORACLE_CASES, ids=ORACLE_IDS)
def test_fastpeft_adapter_loads_in_hf(base_name, method, tmp_path):
    make, inputs_fn, _ = BASES[base_name]
    inputs = inputs_fn()
    fp_model = fp_adapter(base_name, method)
    expected = outputs(fp_model, inputs)
    assert_changes_base(expected, outputs(make(), inputs), "fastpeft vs base")
    fp_model.save_pretrained(tmp_path)

    hf_model = peft.PeftModel.from_pretrained(make(), tmp_path)
    assert_close(outputs(hf_model, inputs), expected, "HF PEFT(fastpeft file) vs fastpeft")


def _normalise(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k != "peft_version"}
    return {k: sorted(set(v)) if isinstance(v, list) else v for k, v in config.items()}


@pytest.mark.parametrize(("base_name", "method"), ORACLE_CASES, ids=ORACLE_IDS)
def test_saved_files_match_hf(base_name, method, tmp_path):
    hf_dir, fp_dir = tmp_path / "hf", tmp_path / "fp"
    hf_adapter(base_name, method).save_pretrained(hf_dir)
    fp_adapter(base_name, method).save_pretrained(fp_dir)

    hf_tensors = load_file(hf_dir / "adapter_model.safetensors")
    fp_tensors = load_file(fp_dir / "adapter_model.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in fp_tensors.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in hf_tensors.items()}
    assert "prompt_embeddings" in fp_tensors

    hf_cfg = json.loads((hf_dir / "adapter_config.json").read_text())
    fp_cfg = json.loads((fp_dir / "adapter_config.json").read_text())
    assert "peft_version" in fp_cfg
    assert fp_cfg["inference_mode"] is True
    assert _normalise(fp_cfg) == _normalise(hf_cfg)


LOSS_CASES = [(b, m) for b in ("llama", "gpt2", "t5") for m in MAIN_METHODS] + [
    ("bert_seq_cls", m) for m in EMBEDDING_METHODS]




@pytest.mark.parametrize(("base_name", "method"), LOSS_CASES, ids=[f"{b}-{m}" for b, m in LOSS_CASES])
def test_loss_with_labels_matches_hf(base_name, method, tmp_path):
    make, inputs_fn, _ = BASES[base_name]
    inputs = _labelled(base_name, inputs_fn())
    hf_model = hf_adapter(base_name, method)
    with torch.no_grad():
        expected = hf_model(**inputs).loss
    hf_model.save_pretrained(tmp_path)
    fp_model = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        got = fp_model(**inputs)
    assert got.loss is not None and torch.isfinite(got.loss)
    torch.testing.assert_close(got.loss, expected, atol=ATOL, rtol=0)
    assert_close(got.logits, outputs(hf_model, inputs), "logits with labels")


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_inputs_embeds_and_position_ids_match_hf(method, tmp_path):
    inputs = models.llama_inputs()
    hf_model = hf_adapter("llama", method)
    hf_model.save_pretrained(tmp_path)
    fp_model = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path)

    embeds = models.make_llama().get_input_embeddings()(inputs["input_ids"]).detach()
    by_embeds = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    assert_close(outputs(fp_model, by_embeds), outputs(hf_model, by_embeds), "inputs_embeds")
    assert_close(outputs(fp_model, by_embeds), outputs(fp_model, inputs), "inputs_embeds vs input_ids")

    # prefix tuning shifts explicit position ids by n; the other methods drop them (both libraries)
    positions = {**inputs, "position_ids": torch.arange(6).repeat(2, 1) + 3}
    assert_close(outputs(fp_model, positions), outputs(hf_model, positions), "position_ids")


def test_token_classification_loss_covers_real_tokens_only():
    """HF PEFT leaves TOKEN_CLS labels short (its loss crashes); fastpeft pads them with -100."""
    model = fp_adapter("bert_token_cls", "prompt_tuning")
    inputs = bert_inputs_with_token_types()
    labels = torch.randint(0, 3, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape == (2, N + 6, 3)
    expected = torch.nn.functional.cross_entropy(out.logits[:, N:].reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


def test_question_answering_loss_uses_shifted_positions():
    model = fp_adapter("bert_qa", "prompt_tuning")
    inputs = models.bert_cls_inputs()
    start, end = torch.tensor([1, 2]), torch.tensor([3, 2])
    with torch.no_grad():
        out = model(**inputs, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (2, N + 6)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(out.start_logits, start + N) + ce(out.end_logits, end + N)) / 2
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# prompt tuning init schemes
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A WordLevel tokenizer: "wK" -> id K (1..99), saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


TEXT_CASES = [
    ("llama", 5, "w10 w11", [10, 11, 10, 11, 10]),  # repeated to fill
    ("llama", 2, "w10 w11 w12", [10, 11]),  # truncated
    ("gpt2", 3, "w7 w8 w9", [7, 8, 9]),  # exact
    ("t5", 3, "w10 w11", [10, 11, 10, 11, 10, 11]),  # 2 * n rows for encoder-decoders
]


@pytest.mark.parametrize(("base_name", "n", "text", "ids"), TEXT_CASES,
                         ids=[c[0] + str(c[1]) for c in TEXT_CASES])
def test_text_init_copies_word_embeddings(base_name, n, text, ids, word_tokenizer):
    from transformers import AutoTokenizer

    make, _, task = BASES[base_name]
    assert (AutoTokenizer.from_pretrained(word_tokenizer)(text)["input_ids"]
            == [int(w[1:]) for w in text.split()])
    # the rule of spec section 1, written out independently
    reps = math.ceil(len(ids) / len(text.split()))
    assert ([int(w[1:]) for w in text.split()] * reps)[: len(ids)] == ids

    kwargs = {"num_virtual_tokens": n, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text,
              "tokenizer_name_or_path": word_tokenizer}
    base = make()
    fp_model = fastpeft.get_peft_model(base, fastpeft.PromptTuningConfig(task_type=task, **kwargs))
    rows = fp_model.prompt_encoder["default"].embedding.weight
    assert rows.dtype == torch.float32
    assert torch.equal(rows, base.get_input_embeddings().weight[ids])
    assert rows.requires_grad

    hf_model = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task, **kwargs))
    assert torch.equal(rows, hf_model.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize("base_name", ["llama", "t5"])
def test_sample_vocab_init_copies_vocabulary_rows(base_name):
    make, _, task = BASES[base_name]
    base = make()
    model = fastpeft.get_peft_model(base, make_config(fastpeft, "prompt_tuning_sample_vocab", task,
                                                      num_virtual_tokens=8))
    rows = model.prompt_encoder["default"].embedding.weight
    vocab = base.get_input_embeddings().weight
    rows_per_submodule = 2 if task == "SEQ_2_SEQ_LM" else 1
    assert rows.shape == (8 * rows_per_submodule, vocab.shape[1])
    picked = []
    for row in rows:
        matches = [i for i in range(vocab.shape[0]) if torch.equal(vocab[i], row)]
        assert matches, "a SAMPLE_VOCAB row is not a copy of a word embedding"
        picked.append(matches[0])
    assert len(set(picked)) > 1


def test_random_init_is_standard_normal_and_not_vocabulary():
    base = models.make_llama()
    model = fastpeft.get_peft_model(base, make_config(fastpeft, "prompt_tuning", "CAUSAL_LM",
                                                      num_virtual_tokens=16))
    rows = model.prompt_encoder["default"].embedding.weight.detach()
    assert rows.shape == (16, 32)
    assert 0.8 < rows.std().item() < 1.2 and abs(rows.mean().item()) < 0.2
    vocab = base.get_input_embeddings().weight
    assert not any(torch.equal(vocab[i], rows[0]) for i in range(vocab.shape[0]))


# ----------------------------------------------------------------------------------------------
