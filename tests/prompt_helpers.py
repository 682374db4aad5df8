"""Shared bases, method configs and helpers for the soft-prompt test files (test_prompt_*.py)."""

from __future__ import annotations

import peft  # noqa: E402
import torch

import fastpeft  # noqa: E402

import models

ATOL = 1e-5
N = 4  # num_virtual_tokens everywhere unless a test says otherwise


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

    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=None, initializer_factor=3.0)
    torch.manual_seed(1234)
    return T5ForConditionalGeneration(cfg).eval()


# facebook/bart-base's special ids and forcing rules: its decoder starts with eos (2), not with pad or bos
BART_GENERATION = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
                   "forced_bos_token_id": 0, "forced_eos_token_id": 2}


def make_bart_for_generation():
    """A tiny BART with bart-base's generation config; init_std=1.0 so that greedy output varies."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    ids = {k: v for k, v in BART_GENERATION.items() if not k.startswith("forced")}
    cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, init_std=1.0, **ids)
    torch.manual_seed(1230)
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(**BART_GENERATION)
    return model


# Bases for the generate oracle (test_prompt_generate_oracle.py): large initial weights, so that greedy output
# varies from token to token and a soft prompt changes it (the small default inits repeat one token).
def make_t5_with_eos():
    """t5-small's special ids (pad = decoder start = 0, eos = 1) on a tiny T5."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=3.0)
    torch.manual_seed(1)
    return T5ForConditionalGeneration(cfg).eval()


def make_llama_for_generation():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=1.0, attn_implementation="eager")
    torch.manual_seed(4321)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2_for_generation():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=1, initializer_range=1.0, attn_implementation="eager")
    torch.manual_seed(4321)
    return GPT2LMHeadModel(cfg).eval()


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
    "cartridge": ("CartridgeConfig", {"num_frozen_tokens": 1}),  # its first row frozen: not perturbed
}
MAIN_METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection", "cartridge"]
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


def _prompt_ids(seed, shape=(2, 5)):
    return torch.randint(2, 100, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- generate() models
# the adapted bases of the generate suites (tests/prompt/test_prompt_generate_oracle.py, ..._settings.py)
GEN_TASK_IDS = torch.tensor([2, 0])
GEN_BASES = {"llama": (make_llama_for_generation, "CAUSAL_LM"),
             "gpt2": (make_gpt2_for_generation, "CAUSAL_LM"),
             "t5": (make_t5_with_eos, "SEQ_2_SEQ_LM"), "bart": (make_bart_for_generation, "SEQ_2_SEQ_LM")}


def _multitask(task):
    # one prompt stack on encoder-decoders: with two, forward puts rows in front of the decoder inputs that
    # HF PEFT's generate (and so fastpeft's) never uses, so no forward-based greedy loop can equal generate
    return fastpeft.MultitaskPromptTuningConfig(
        task_type=task, num_virtual_tokens=N, num_tasks=3, num_ranks=2,
        num_transformer_submodules=1 if task == "SEQ_2_SEQ_LM" else None)


def _cpt(task):
    return fastpeft.CPTConfig(task_type=task, cpt_token_ids=[5, 6, 7, 8], cpt_mask=[1] * 4,
                              cpt_tokens_type_mask=[1, 2, 2, 3])


def _adaption(task):
    return fastpeft.AdaptionPromptConfig(task_type=task, adapter_len=3, adapter_layers=2)


GEN_BUILDERS = {"multitask": _multitask, "cpt": _cpt, "adaption_prompt": _adaption}


def adapted(base_name, method, seed=3):
    """The adapted model and the extra keywords each call needs (task_ids for multitask prompt tuning)."""
    make, task = GEN_BASES[base_name]
    config = GEN_BUILDERS[method](task) if method in GEN_BUILDERS else make_config(fastpeft, method, task)
    model = fastpeft.get_peft_model(make(), config)
    perturb(model, seed)
    return model.eval(), ({"task_ids": GEN_TASK_IDS} if method == "multitask" else {})
