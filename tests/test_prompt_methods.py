"""Soft-prompt methods (prompt tuning, p-tuning, prefix tuning) against HF PEFT and their own contract.

HF PEFT 0.21.2 is the oracle for forward outputs, losses, files and init (docs/notes/prompt_methods_spec.md).
Its generate() is broken for prompt methods with transformers 5.24 (spec section 5), so generation is
checked against a hand-written greedy loop over forward() instead (no cache, full sequence every step).
Every adapter is perturbed before it is compared, so a dropped or mis-mapped prompt changes the outputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402

ATOL = 1e-5
N = 4  # num_virtual_tokens everywhere unless a test says otherwise


pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------
# bases and method configs
# ----------------------------------------------------------------------------------------------


def _bert_config(num_labels):
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                      attn_implementation="eager")


def make_bert_token_cls():
    from transformers import BertForTokenClassification

    torch.manual_seed(77)
    return BertForTokenClassification(_bert_config(3)).eval()


def make_bert_qa():
    from transformers import BertForQuestionAnswering

    torch.manual_seed(78)
    return BertForQuestionAnswering(_bert_config(2)).eval()


def make_bert_bare():
    from transformers import BertModel

    torch.manual_seed(79)
    return BertModel(_bert_config(2)).eval()


def bert_inputs_with_token_types():
    inputs = models.bert_cls_inputs()
    g = torch.Generator().manual_seed(21)
    inputs["token_type_ids"] = torch.randint(0, 2, inputs["input_ids"].shape, generator=g)
    return inputs


def make_t5_for_generation():
    """A tiny T5 whose greedy output is not all pad tokens (make_t5's is) and that has no eos to stop on."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=None, initializer_factor=3.0)
    torch.manual_seed(1234)
    return T5ForConditionalGeneration(cfg).eval()


# name -> (factory, inputs, task_type)
BASES = {
    "llama": (models.make_llama, models.llama_inputs, "CAUSAL_LM"),
    "gpt2": (models.make_gpt2, models.gpt2_inputs, "CAUSAL_LM"),
    "t5": (models.make_t5, models.t5_inputs, "SEQ_2_SEQ_LM"),
    "bert_seq_cls": (models.make_bert_cls, bert_inputs_with_token_types, "SEQ_CLS"),
    "bert_token_cls": (make_bert_token_cls, bert_inputs_with_token_types, "TOKEN_CLS"),
    # HF PEFT silently drops token_type_ids for QA (spec 0.6): compare without them
    "bert_qa": (make_bert_qa, models.bert_cls_inputs, "QUESTION_ANS"),
    "bert_bare": (make_bert_bare, bert_inputs_with_token_types, "FEATURE_EXTRACTION"),
}

# name -> (config class name, kwargs)
METHODS = {
    "prompt_tuning": ("PromptTuningConfig", {}),
    "prompt_tuning_sample_vocab": ("PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "p_tuning_defaults": ("PromptEncoderConfig", {}),
    "p_tuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "p_tuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM",
                                              "encoder_hidden_size": 16}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 24}),
}
MAIN_METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection"]
EMBEDDING_METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"]


def make_config(lib, method, task_type, **overrides):
    cls_name, kwargs = METHODS[method]
    kwargs = {"num_virtual_tokens": N, **kwargs, **overrides}
    return getattr(lib, cls_name)(task_type=task_type, **kwargs)


def perturb(model, seed):
    """Add seeded noise to every trainable parameter (prompt encoders and modules_to_save heads)."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
                touched += 1
    assert touched > 0, "no trainable parameters"


def outputs(model, inputs, **extra):
    """The main output tensor of any task model (QA: start and end logits side by side)."""
    with torch.no_grad():
        out = model(**inputs, **extra)
    if getattr(out, "start_logits", None) is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_changes_base(adapted, base, what):
    """The adapter must change the real-token outputs (those after the virtual tokens, if any)."""
    if adapted.shape != base.shape:  # prompt rows prepended: compare the trailing real positions
        adapted = adapted[:, -base.shape[1]:]
    assert adapted.shape == base.shape, what
    assert (adapted - base).abs().max().item() > 1e-3, f"{what}: the adapter does not change the outputs"


def hf_adapter(base_name, method, seed=1):
    make, inputs_fn, task = BASES[base_name]
    model = peft.get_peft_model(make(), make_config(peft, method, task))
    perturb(model, seed)
    return model.eval()


def fp_adapter(base_name, method, seed=2):
    make, inputs_fn, task = BASES[base_name]
    model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))
    perturb(model, seed)
    return model.eval()


ORACLE_CASES = (
    [(b, m) for b in ("llama", "gpt2", "t5") for m in MAIN_METHODS]
    + [("llama", "prompt_tuning_sample_vocab"), ("llama", "p_tuning_defaults"), ("t5", "p_tuning_defaults")]
    + [(b, m) for b in ("bert_seq_cls", "bert_token_cls", "bert_qa") for m in EMBEDDING_METHODS]
    + [("bert_bare", m) for m in MAIN_METHODS]
)
ORACLE_IDS = [f"{b}-{m}" for b, m in ORACLE_CASES]


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


def _labelled(base_name, inputs):
    inputs = dict(inputs)
    if base_name == "t5":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    elif base_name == "bert_seq_cls":
        inputs["labels"] = torch.tensor([1, 1])
    else:
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        inputs["labels"] = labels
    return inputs


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


@pytest.mark.parametrize(("base_name", "n", "text", "ids"), TEXT_CASES, ids=[c[0] + str(c[1]) for c in TEXT_CASES])
def test_text_init_copies_word_embeddings(base_name, n, text, ids, word_tokenizer):
    from transformers import AutoTokenizer

    make, _, task = BASES[base_name]
    assert AutoTokenizer.from_pretrained(word_tokenizer)(text)["input_ids"] == [int(w[1:]) for w in text.split()]
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
    model = fastpeft.get_peft_model(base, make_config(fastpeft, "prompt_tuning", "CAUSAL_LM", num_virtual_tokens=16))
    rows = model.prompt_encoder["default"].embedding.weight.detach()
    assert rows.shape == (16, 32)
    assert 0.8 < rows.std().item() < 1.2 and abs(rows.mean().item()) < 0.2
    vocab = base.get_input_embeddings().weight
    assert not any(torch.equal(vocab[i], rows[0]) for i in range(vocab.shape[0]))


# ----------------------------------------------------------------------------------------------
# 2. generate
# ----------------------------------------------------------------------------------------------


def greedy_loop(model, input_ids, attention_mask, steps):
    """Greedy decoding by hand: full forward over the whole sequence at every step, no cache."""
    ids, mask = input_ids.clone(), attention_mask.clone()
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def greedy_loop_seq2seq(model, input_ids, attention_mask, steps, start=0):
    dec = torch.full((input_ids.shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    return dec


CAUSAL_GEN = [(b, m) for b in ("llama", "gpt2") for m in MAIN_METHODS]
CAUSAL_GEN_IDS = [f"{b}-{m}" for b, m in CAUSAL_GEN]


def _prompt_ids(seed, shape=(2, 5)):
    return torch.randint(2, 100, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("base_name", "method"), CAUSAL_GEN, ids=CAUSAL_GEN_IDS)
def test_causal_greedy_generate_equals_manual_loop(base_name, method):
    model = fp_adapter(base_name, method, seed=3)
    ids = _prompt_ids(5)
    mask = torch.ones_like(ids)
    expected = greedy_loop(model, ids, mask, 6)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert got.shape == (2, 11)
    assert torch.equal(got, expected), f"generate {got.tolist()} != manual {expected.tolist()}"
    # the prompt is really used by generate: the base model continues differently
    base = BASES[base_name][0]()
    assert not torch.equal(greedy_loop(base, ids, mask, 6), expected)


@pytest.mark.parametrize(("base_name", "method"), [("llama", "p_tuning_lstm"), ("llama", "prefix_projection"),
                                                    ("gpt2", "prompt_tuning"), ("gpt2", "prefix")])
def test_generate_of_loaded_hf_adapter_follows_hf_forward(base_name, method, tmp_path):
    """fastpeft generate (inference layout, HF file) == a greedy loop over HF PEFT's own forward."""
    hf_model = hf_adapter(base_name, method, seed=9)
    hf_model.save_pretrained(tmp_path)
    model = fastpeft.PeftModel.from_pretrained(BASES[base_name][0](), tmp_path)
    ids = _prompt_ids(15, (2, 5))
    mask = torch.ones_like(ids)
    expected = greedy_loop(hf_model, ids, mask, 5)
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
    assert torch.equal(alone1, greedy_loop(model, ids[1:], mask[1:], 6))


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
    expected = greedy_loop_seq2seq(model, ids, mask, 6)
    assert len(set(expected[:, 1:].flatten().tolist())) > 1, "degenerate generation: every token the same"
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected), f"generate {got.tolist()} != manual {expected.tolist()}"
    alone = model.generate(input_ids=ids[2:, :3], attention_mask=mask[2:, :3], max_new_tokens=6, do_sample=False)
    assert torch.equal(alone[0], got[2])


SEQ2SEQ_HF_GEN = [("prompt_tuning", {"max_new_tokens": 5}), ("p_tuning_mlp", {"max_new_tokens": 5}),
                  ("p_tuning_lstm", {"max_new_tokens": 5}),
                  # max_length counts decoder tokens for encoder-decoders (decoder start + 4 new ones)
                  ("prompt_tuning", {"max_length": 5}),
                  ("p_tuning_mlp", {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2})]


@pytest.mark.parametrize(("method", "kw"), SEQ2SEQ_HF_GEN, ids=[f"{m}-{'-'.join(k)}" for m, k in SEQ2SEQ_HF_GEN])
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


SEVERAL = [("llama", "prompt_tuning"), ("llama", "prefix"), ("gpt2", "prefix_projection"), ("t5", "prompt_tuning"),
           ("t5", "prefix")]


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
    beams = model.generate(input_ids=ids, max_new_tokens=4, num_beams=3, num_return_sequences=2, pad_token_id=0)
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


# ----------------------------------------------------------------------------------------------
# 3. contract
# ----------------------------------------------------------------------------------------------

GRAD_CASES = [("llama", m) for m in MAIN_METHODS] + [("t5", "prompt_tuning"), ("t5", "prefix"),
                                                      ("bert_seq_cls", "prompt_tuning"),
                                                      ("bert_seq_cls", "p_tuning_mlp"),
                                                      ("bert_token_cls", "prompt_tuning"),
                                                      ("bert_qa", "p_tuning_lstm"), ("bert_bare", "prefix")]


@pytest.mark.parametrize(("base_name", "method"), GRAD_CASES, ids=[f"{b}-{m}" for b, m in GRAD_CASES])
def test_only_prompt_encoder_and_heads_train(base_name, method):
    make, _, task = BASES[base_name]
    fp_model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))
    hf_model = peft.get_peft_model(make(), make_config(peft, method, task))
    fp_trainable = {n for n, p in fp_model.named_parameters() if p.requires_grad}
    hf_trainable = {n for n, p in hf_model.named_parameters() if p.requires_grad}
    assert fp_trainable == hf_trainable
    assert {n for n, _ in fp_model.named_parameters()} == {n for n, _ in hf_model.named_parameters()}
    heads = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}
    for name in fp_trainable:
        assert name.startswith("prompt_encoder.default.") or (
            task in heads and ".modules_to_save.default." in name), name
    assert any(n.startswith("prompt_encoder.default.") for n in fp_trainable)
    assert (task in heads) == any(".modules_to_save." in n for n in fp_trainable)


TRAIN_CASES = [("llama", m) for m in MAIN_METHODS] + [("gpt2", "prefix"), ("t5", "prompt_tuning"),
                                                       ("t5", "prefix_projection"),
                                                       ("bert_seq_cls", "p_tuning_mlp")]


@pytest.mark.parametrize(("base_name", "method"), TRAIN_CASES, ids=[f"{b}-{m}" for b, m in TRAIN_CASES])
def test_adamw_steps_lower_the_loss(base_name, method):
    make, inputs_fn, task = BASES[base_name]
    model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))
    frozen = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if not p.requires_grad}
    encoder = {n: p.detach().clone() for n, p in model.prompt_encoder.named_parameters()}
    inputs = _labelled(base_name, inputs_fn())

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**inputs).loss.item()

    start = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(8):
        model.train()
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < start - 1e-3, (start, end)
    for n, p in model.get_base_model().named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen base parameter {n} changed"
    assert all(not torch.equal(p, encoder[n]) for n, p in model.prompt_encoder.named_parameters())


ROUNDTRIP_CASES = [(b, m) for b in ("llama", "t5") for m in MAIN_METHODS] + [
    ("bert_seq_cls", "p_tuning_lstm"), ("bert_bare", "prefix_projection")]


@pytest.mark.parametrize(("base_name", "method"), ROUNDTRIP_CASES, ids=[f"{b}-{m}" for b, m in ROUNDTRIP_CASES])
def test_save_load_roundtrip(base_name, method, tmp_path):
    make, inputs_fn, _ = BASES[base_name]
    inputs = inputs_fn()
    model = fp_adapter(base_name, method)
    before = outputs(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    assert loaded.peft_config["default"].inference_mode is True
    torch.testing.assert_close(outputs(loaded, inputs), before, atol=1e-6, rtol=0)
    # the model that saved is unchanged by saving
    assert model.peft_config["default"].inference_mode is False
    torch.testing.assert_close(outputs(model, inputs), before, atol=0, rtol=0)


DISABLE_CASES = [("llama", "prompt_tuning"), ("llama", "p_tuning_lstm"), ("llama", "prefix"),
                 ("gpt2", "prefix_projection"), ("t5", "prompt_tuning"), ("t5", "prefix"),
                 ("bert_seq_cls", "prompt_tuning"), ("bert_bare", "prefix")]


@pytest.mark.parametrize(("base_name", "method"), DISABLE_CASES, ids=[f"{b}-{m}" for b, m in DISABLE_CASES])
def test_disable_adapter_gives_base_model(base_name, method):
    make, inputs_fn, _ = BASES[base_name]
    inputs = inputs_fn()
    base_out = outputs(make(), inputs)
    model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, BASES[base_name][2]))
    perturb(model, 6)
    model.eval()
    adapted = outputs(model, inputs)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with model.disable_adapter():
        assert torch.equal(outputs(model, inputs), base_out)
    assert torch.equal(outputs(model, inputs), adapted)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


def test_disable_adapter_generate_is_base_generate():
    model = fp_adapter("llama", "prompt_tuning", seed=3)
    ids = _prompt_ids(12)
    kw = {"max_new_tokens": 5, "do_sample": False}
    with model.disable_adapter():
        disabled = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(disabled, models.make_llama().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                              **kw))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_two_prompt_adapters(method, tmp_path):
    inputs = models.llama_inputs()
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, "CAUSAL_LM"))
    perturb(model, 7)
    model.add_adapter("other", make_config(fastpeft, method, "CAUSAL_LM"))
    assert model.active_adapter == "default"
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("prompt_encoder.other.")}
    perturb(model, 8)  # only "other" is trainable now
    model.eval()
    out_other = outputs(model, inputs)
    model.set_adapter("default")
    out_default = outputs(model, inputs)
    assert (out_other - out_default).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    hf_model = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path).eval()
    assert_close(outputs(hf_model, inputs), out_default, "HF default")
    hf_model.load_adapter(tmp_path / "other", adapter_name="other")
    hf_model.set_adapter("other")
    assert_close(outputs(hf_model, inputs), out_other, "HF other")

    model.set_adapter("other")
    model.delete_adapter("other")
    assert set(model.peft_config) == {"default"} and model.active_adapter == "default"
    assert not any(n.startswith("prompt_encoder.other.") for n, _ in model.named_parameters())
    assert_close(outputs(model, inputs), out_default, "after delete_adapter")


def test_adapters_of_different_prompt_types_are_refused():
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "prompt_tuning", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="PREFIX_TUNING|PROMPT_TUNING"):
        model.add_adapter("other", make_config(fastpeft, "prefix", "CAUSAL_LM"))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix"])
def test_merge_and_unload_is_refused(method):
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, "CAUSAL_LM"))
    for call in (model.merge_and_unload, model.merge_adapter, model.unload):
        with pytest.raises(ValueError, match="prompt"):
            call()


# ----------------------------------------------------------------------------------------------
# 4. bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, None])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_bad_num_virtual_tokens(method, n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fastpeft.get_peft_model(models.make_llama(),
                                make_config(fastpeft, method, "CAUSAL_LM", num_virtual_tokens=n))


def test_text_init_needs_tokenizer_and_text():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="w1 w2")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                    tokenizer_name_or_path="somewhere")


@pytest.mark.parametrize("make", [models.make_llama, models.make_gpt2])
def test_prefix_with_gradient_checkpointing_is_refused(make):
    base = make()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fastpeft.get_peft_model(base, make_config(fastpeft, "prefix", "CAUSAL_LM"))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_trainable_load_is_refused(method, tmp_path):
    fp_adapter("llama", method).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is_trainable"):
        fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path, is_trainable=True)
    model = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path)
    with pytest.raises(ValueError, match="is_trainable"):
        model.load_adapter(tmp_path, adapter_name="again", is_trainable=True)
    assert set(model.peft_config) == {"default"}


def test_positional_forward_args():
    ids = models.llama_inputs()["input_ids"]
    config = make_config(fastpeft, "prompt_tuning", "CAUSAL_LM")
    generic = fastpeft.PeftModel(models.make_llama(), config)
    with pytest.raises(TypeError, match="keyword"):
        generic(ids)
    # the task class names input_ids first, as HF PEFT's does: a positional call is that keyword
    task_model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "prompt_tuning", "CAUSAL_LM"))
    torch.testing.assert_close(outputs(task_model, {}, input_ids=ids), task_model(ids).logits.detach())


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix"])
def test_task_type_none_is_refused(method):
    with pytest.raises(ValueError, match="task_type"):
        fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, None))


@pytest.mark.parametrize("make", [models.make_bert_cls, make_bert_token_cls, make_bert_qa])
@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_prefix_on_bert_heads_is_refused_at_creation(make, method):
    task = {"BertForSequenceClassification": "SEQ_CLS", "BertForTokenClassification": "TOKEN_CLS",
            "BertForQuestionAnswering": "QUESTION_ANS"}[type(make()).__name__]
    with pytest.raises(ValueError, match="(?i)prefix tuning.*cache"):
        fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))


def test_forward_without_inputs_is_refused():
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "prompt_tuning", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="input_ids"):
        model(attention_mask=torch.ones(1, 3, dtype=torch.long))
