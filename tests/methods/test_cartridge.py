"""Cartridges (CartridgeConfig) against HF PEFT 0.21.2 on tiny causal LMs.

The generic soft-prompt suites run the `cartridge` row of tests/prompt_helpers.py (forward / loss / files
against HF PEFT, save-load, generate against greedy full forwards); this file covers what is specific: the
frozen rows, initialisation from a real prefill (checked against the model's own cache), composition,
and the errors.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft

import models
import prompt_helpers as ph
from greedy_reference import greedy_reference

ATOL = 1e-5
BASES = {"llama": (models.make_llama, models.llama_inputs), "gpt2": (models.make_gpt2, models.gpt2_inputs)}


def _config(lib, n=4, frozen=1, **kwargs):
    return lib.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, num_frozen_tokens=frozen,
                               **kwargs)


def _rows(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pair(base="llama", n=4, frozen=1, seed=0):
    """HF PEFT's and fastpeft's cartridge on the same base, with the same (seeded, non-trivial) rows."""
    make, _ = BASES[base]
    hf = peft.get_peft_model(make(), _config(peft, n, frozen))
    fp = fastpeft.get_peft_model(make(), _config(fastpeft, n, frozen))
    rows = _rows(seed, hf.prompt_encoder["default"].weight.shape)
    hf.prompt_encoder["default"].load_prompt_embeddings(rows)
    fp.prompt_encoder["default"].load_prompt_embeddings(rows)
    return hf.eval(), fp.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("base", ["llama", "gpt2"])
@pytest.mark.parametrize("frozen", [0, 1, 3])
def test_same_rows_give_hf_logits(base, frozen):
    hf, fp = _pair(base, frozen=frozen)
    inputs = BASES[base][1]()
    theirs, ours = _logits(hf, inputs), _logits(fp, inputs)
    _close(ours, theirs, f"{base} logits")
    with fp.disable_adapter():
        plain = _logits(fp, inputs)
    assert (ours - plain).abs().max() > 100 * ATOL, "the cartridge does not change the outputs"


@pytest.mark.parametrize("frozen", [0, 2, 4])
def test_parameters_and_trainable_counts_match_hf(frozen):
    hf, fp = _pair(frozen=frozen)

    def layout(model):
        return {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters() if "prompt" in n}

    assert layout(fp) == layout(hf)
    assert fp.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    # the frozen rows stay frozen through the adapter state changes that re-enable gradients
    with fp.disable_adapter():
        pass
    fp.set_adapter("default")
    assert layout(fp) == layout(hf)


def test_one_training_step_gradients_match_hf_and_frozen_rows_get_none():
    hf, fp = _pair(frozen=2)
    inputs = models.llama_inputs()
    inputs["labels"] = inputs["input_ids"].clone()
    for model in (hf, fp):
        model.train()
        model(**inputs).loss.backward()
    theirs, ours = hf.prompt_encoder["default"], fp.prompt_encoder["default"]
    assert ours.frozen_embedding.grad is None and theirs.frozen_embedding.grad is None
    assert ours.trainable_embedding.grad.abs().max() > 1e-4
    _close(ours.trainable_embedding.grad, theirs.trainable_embedding.grad, "trainable rows' gradient")
    assert all(p.grad is None for p in fp.get_base_model().parameters())
    # an optimizer step over every parameter that requires grad leaves the frozen rows unchanged
    before = ours.frozen_embedding.detach().clone()
    torch.optim.SGD([p for p in fp.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(ours.frozen_embedding, before)


# ------------------------------------------------------------------------------------------------ files
def test_fastpeft_files_load_in_hf(tmp_path):
    hf_ref, fp = _pair(frozen=1, seed=3)
    fp.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}
    assert torch.equal(saved["prompt_embeddings"], fp.prompt_encoder["default"].weight.detach())
    hf_ref.save_pretrained(tmp_path / "hf")
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert ours_cfg["num_frozen_tokens"] == theirs_cfg["num_frozen_tokens"] == 1
    assert set(theirs_cfg) - set(ours_cfg) <= {"auto_mapping"}, set(theirs_cfg) ^ set(ours_cfg)

    loaded = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path).eval()  # fresh random rows first
    inputs = models.llama_inputs()
    _close(_logits(loaded, inputs), _logits(fp, inputs), "HF PEFT on fastpeft's file")


def test_hf_files_load_in_fastpeft_over_other_rows(tmp_path):
    hf, _ = _pair(frozen=2, seed=4)
    hf.save_pretrained(tmp_path)
    fp = fastpeft.get_peft_model(models.make_llama(), _config(fastpeft, frozen=2)).eval()
    old = fp.prompt_encoder["default"].weight.detach().clone()
    fp.load_adapter(tmp_path, adapter_name="file")
    new = fp.prompt_encoder["file"]
    assert not new.frozen_embedding.requires_grad and not new.trainable_embedding.requires_grad
    fp.set_adapter("file")
    file_rows = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
    assert (old - file_rows).abs().min() > 0  # every row, frozen ones included, differed before the load
    assert torch.equal(new.frozen_embedding, file_rows[:2])
    assert torch.equal(new.trainable_embedding, file_rows[2:])
    inputs = models.llama_inputs()
    _close(_logits(fp, inputs), _logits(hf, inputs), "fastpeft on HF PEFT's file")
    again = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path).eval()
    _close(_logits(again, inputs), _logits(hf, inputs), "from_pretrained on HF PEFT's file")


def test_set_state_dict_writes_frozen_and_trainable_rows():
    _, fp = _pair(frozen=1, seed=5)
    rows = _rows(6, fp.prompt_encoder["default"].weight.shape)
    fastpeft.set_peft_model_state_dict(fp, {"prompt_embeddings": rows})
    assert torch.equal(fp.prompt_encoder["default"].weight, rows)
    assert torch.equal(fastpeft.get_peft_model_state_dict(fp)["prompt_embeddings"], rows)


def test_file_of_another_shape_is_refused_and_leaves_the_rows(tmp_path):
    _, fp = _pair(n=4)
    fastpeft.get_peft_model(models.make_llama(), _config(fastpeft, n=5)).save_pretrained(tmp_path)
    before = fp.prompt_encoder["default"].weight.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        fastpeft.set_peft_model_state_dict(fp, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert torch.equal(fp.prompt_encoder["default"].weight, before)


# ------------------------------------------------------------------------------------------------ init
TEXT_IDS = torch.tensor([[1, 17, 42, 8, 93, 25, 61, 33, 70]])


def _prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True).past_key_values


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_init_from_past_key_values_is_the_prefill_and_continues_it(base):
    """Rows from a prefill of the first n tokens make the cartridge act as that text: its logits on a
    continuation equal the base model's on text + continuation (positions and keys alike)."""
    n, make = 6, BASES[base][0]
    hf, fp = _pair(base, n=n, frozen=1)
    cache = _prefill(make(), TEXT_IDS)  # 9 tokens: only the first 6 are taken
    ours = fastpeft.initialize_kv_prefix_from_past_key_values(fp, past_key_values=cache)
    theirs = peft.initialize_kv_prefix_from_past_key_values(hf, past_key_values=_prefill(make(), TEXT_IDS))
    assert torch.equal(ours, theirs)
    assert torch.equal(fp.prompt_encoder["default"].weight, ours)
    # layer 0's keys, head 1, token 2 sit where the cache layout puts them: [layer][key|value][head][dim]
    key = cache.layers[0].keys[0, 1, 2] if hasattr(cache, "layers") else cache[0][0][0, 1, 2]
    head_dim = key.shape[-1]
    assert torch.equal(ours[2, head_dim:2 * head_dim], key)

    cont = torch.tensor([[5, 9, 77, 31, 12]])
    got = _logits(fp, {"input_ids": cont, "attention_mask": torch.ones_like(cont)})
    full = _logits(make(), {"input_ids": torch.cat([TEXT_IDS[:, :n], cont], 1)})[:, n:]
    _close(got, full, "cartridge from a prefill vs the base model on text + continuation")
    assert (got - _logits(make(), {"input_ids": cont})).abs().max() > 100 * ATOL


def test_generate_from_a_prefill_continues_the_text():
    n = 6
    base = ph.make_llama_for_generation()
    hf = peft.get_peft_model(ph.make_llama_for_generation(), _config(peft, n)).eval()
    fp = fastpeft.get_peft_model(ph.make_llama_for_generation(), _config(fastpeft, n)).eval()
    peft.initialize_kv_prefix_from_past_key_values(hf, past_key_values=_prefill(base, TEXT_IDS))
    fastpeft.initialize_kv_prefix_from_past_key_values(fp, past_key_values=_prefill(base, TEXT_IDS))
    ids = torch.tensor([[5, 9, 77], [31, 12, 64]])
    mask = torch.ones_like(ids)
    got = fp.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    # HF PEFT 0.21's prompt generate gives other tokens on transformers 5.2x (see docs/architecture.md): the
    # oracle is greedy decoding by full forwards of HF PEFT's model, whose forward matches ours
    assert torch.equal(got, greedy_reference(hf, ids, mask, max_new_tokens=6))
    # the same as the base model given the text in front of each prompt
    full = torch.cat([TEXT_IDS[:, :n].expand(2, -1), ids], 1)
    base_out = base.generate(input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=6,
                             do_sample=False)
    assert torch.equal(got[:, ids.shape[1]:], base_out[:, full.shape[1]:])
    with fp.disable_adapter():
        plain = fp.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, got)


class PlainTokenizer:
    """Characters to ids 2..91, as a tokenizer without a chat template would give them."""

    def __call__(self, text, return_tensors=None, truncation=False, max_length=None):
        ids = [2 + ord(c) % 90 for c in text]
        return {"input_ids": torch.tensor([ids[:max_length] if truncation else ids])}


class ChatTokenizer(PlainTokenizer):
    """A chat template that wraps the system message in ids 1 ... 1."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, return_dict, return_tensors):
        assert messages[0]["role"] == "system" and tokenize and not return_dict
        return torch.tensor([[1, *self(messages[0]["content"])["input_ids"][0].tolist(), 1]])


class NoTemplateTokenizer(PlainTokenizer):
    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("this tokenizer has no chat template")


@pytest.mark.parametrize(("tokenizer", "kwargs", "prefix"), [
    (PlainTokenizer(), {}, []), (ChatTokenizer(), {}, [1]), (NoTemplateTokenizer(), {}, []),
    (ChatTokenizer(), {"use_chat_template": False}, []), (ChatTokenizer(), {"max_length": 7}, [1])],
    ids=["plain", "chat", "no-template", "chat-off", "chat-max-length"])
def test_init_from_text_matches_hf_and_the_prefill(tokenizer, kwargs, prefix):
    hf, fp = _pair(n=5)
    text = "a long context"
    ours = fastpeft.initialize_kv_prefix_from_text(fp, tokenizer, text=text, **kwargs)
    theirs = peft.initialize_kv_prefix_from_text(hf, tokenizer, text=text, **kwargs)
    assert torch.equal(ours, theirs)
    ids = torch.tensor([prefix + PlainTokenizer()(text)["input_ids"][0].tolist()])
    expected = fastpeft.prompt_embeddings_from_past_key_values(_prefill(models.make_llama(), ids),
                                                               num_virtual_tokens=5)
    # the reference prefill may be shorter (no closing template id): equal up to float summation order
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert torch.equal(fp.prompt_encoder["default"].weight, ours)


def test_init_into_prefix_tuning_matches_hf_and_projection_is_refused():
    hf = peft.get_peft_model(models.make_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=4))
    fp = fastpeft.get_peft_model(models.make_llama(), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                  num_virtual_tokens=4))
    theirs = peft.initialize_kv_prefix_from_text(hf, PlainTokenizer(), text="some context")
    ours = fastpeft.initialize_kv_prefix_from_text(fp, PlainTokenizer(), text="some context")
    assert torch.equal(ours, theirs) and torch.equal(fp.prompt_encoder["default"].embedding.weight, ours)
    inputs = models.llama_inputs()
    _close(_logits(fp.eval(), inputs), _logits(hf.eval(), inputs), "prefix tuning initialised from text")
    projected = fastpeft.get_peft_model(models.make_llama(), fastpeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True))
    with pytest.raises(ValueError, match="prefix_projection"):
        fastpeft.initialize_kv_prefix_from_text(projected, PlainTokenizer(), text="some context")


@pytest.mark.parametrize(("text", "kwargs", "match"), [
    ("abc", {}, "Need at least 5 cached tokens, got 3"),
    ("a long context", {"max_length": 4}, "Need at least 5 cached tokens, got 4"),
    ("a long context", {"num_virtual_tokens": 6}, "expected \\(5, 64\\)"),
    ("a long context", {"adapter_name": "other"}, "Unknown adapter 'other'"),
])
def test_bad_init_input_is_refused_and_leaves_the_rows(text, kwargs, match):
    _, fp = _pair(n=5)
    before = fp.prompt_encoder["default"].weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        fastpeft.initialize_kv_prefix_from_text(fp, PlainTokenizer(), text=text, **kwargs)
    assert torch.equal(fp.prompt_encoder["default"].weight, before)


def test_init_from_the_wrong_model_or_cache_is_refused():
    _, fp = _pair(n=4)
    with pytest.raises(ValueError, match="expected \\(4, 64\\)"):  # a GPT-2 cache (4 heads of 8) into llama
        fastpeft.initialize_kv_prefix_from_past_key_values(fp, past_key_values=_prefill(models.make_gpt2(),
                                                                                        TEXT_IDS))
    with pytest.raises(ValueError, match="batch 1"):
        fastpeft.initialize_kv_prefix_from_past_key_values(
            fp, past_key_values=_prefill(models.make_llama(), TEXT_IDS.expand(2, -1)))
    with pytest.raises(TypeError, match="Unsupported past_key_values"):
        fastpeft.initialize_kv_prefix_from_past_key_values(fp, past_key_values=object())
    lora = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="must be a CARTRIDGE or PREFIX_TUNING adapter \\(got LORA\\)"):
        fastpeft.initialize_kv_prefix_from_text(lora, PlainTokenizer(), text="some context")
    with pytest.raises(ValueError, match="PeftModel"):
        fastpeft.initialize_kv_prefix_from_text(models.make_llama(), PlainTokenizer(), text="some context")


# ------------------------------------------------------------------------------------------------ compose
def _saved(tmp_path, name, n, frozen, seed, base="llama"):
    model = fastpeft.get_peft_model(BASES[base][0](), _config(fastpeft, n, frozen))
    encoder = model.prompt_encoder["default"]
    encoder.load_prompt_embeddings(_rows(seed, encoder.weight.shape))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("safe", [True, False])
def test_compose_concatenates_like_hf(tmp_path, safe):
    paths = [_saved(tmp_path, "a", 3, 1, 7), _saved(tmp_path, "b", 2, 0, 8), _saved(tmp_path, "c", 4, 2, 9)]
    fastpeft.compose_cartridge_adapters(paths, output_path=tmp_path / "ours", safe_serialization=safe)
    peft.compose_cartridge_adapters(paths, output_path=tmp_path / "theirs", safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("num_virtual_tokens", "num_frozen_tokens", "token_dim", "num_layers", "peft_type"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert (ours_cfg["num_virtual_tokens"], ours_cfg["num_frozen_tokens"]) == (9, 1)
    ours_rows = fastpeft.load_peft_weights(str(tmp_path / "ours"))["prompt_embeddings"]
    assert (tmp_path / "ours" / weights).is_file()
    parts = [fastpeft.load_peft_weights(str(p))["prompt_embeddings"] for p in paths]
    assert torch.equal(ours_rows, torch.cat(parts))
    assert torch.equal(ours_rows, peft.load_peft_weights(str(tmp_path / "theirs"))["prompt_embeddings"])
    # both libraries run the composed cartridge alike
    inputs = models.llama_inputs()
    theirs = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "ours").eval()
    ours = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "ours").eval()
    _close(_logits(ours, inputs), _logits(theirs, inputs), "composed cartridge")


def test_compose_refuses_bad_inputs(tmp_path):
    a = _saved(tmp_path, "a", 3, 1, 7)
    with pytest.raises(ValueError, match="at least 2"):
        fastpeft.compose_cartridge_adapters([a], output_path=tmp_path / "out")
    gpt2 = _saved(tmp_path, "g", 3, 1, 7, base="gpt2")
    with pytest.raises(ValueError, match="Incompatible CARTRIDGE configs for attribute 'token_dim'"):
        fastpeft.compose_cartridge_adapters([a, gpt2], output_path=tmp_path / "out")
    prefix = tmp_path / "prefix"
    fastpeft.get_peft_model(models.make_llama(), fastpeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(prefix)
    with pytest.raises(ValueError, match="not a CARTRIDGE adapter \\(got PREFIX_TUNING\\)"):
        fastpeft.compose_cartridge_adapters([a, prefix], output_path=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("frozen", "match", "hf_refuses"), [
    (4, "num_frozen_tokens must be <= num_virtual_tokens", True),
    (-1, "num_frozen_tokens must be >= 0", True),
    (1.5, "num_frozen_tokens must be an integer", False),  # HF PEFT accepts it, then builds 1 frozen row
])
def test_bad_config_is_refused(frozen, match, hf_refuses):
    with pytest.raises(ValueError, match=match):
        fastpeft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=frozen)
    if hf_refuses:
        with pytest.raises(ValueError):
            peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=frozen)


def test_all_rows_frozen_runs_like_hf():
    hf, fp = _pair(n=3, frozen=3)
    assert fp.prompt_encoder["default"].trainable_embedding.shape[0] == 0
    inputs = models.llama_inputs()
    _close(_logits(fp, inputs), _logits(hf, inputs), "all rows frozen")


def test_public_names_and_module_paths():
    from fastpeft.tuners.cartridge import CartridgeConfig, CartridgeEncoder
    from fastpeft.tuners.cartridge.utils import compose_cartridge_adapters

    assert CartridgeConfig is fastpeft.CartridgeConfig and CartridgeEncoder is fastpeft.CartridgeEncoder
    assert compose_cartridge_adapters is fastpeft.compose_cartridge_adapters
    assert _config(fastpeft).peft_type == fastpeft.PeftType.CARTRIDGE


def test_file_config_with_too_many_frozen_rows_is_refused_naming_the_file(tmp_path):
    fastpeft.get_peft_model(models.make_llama(), _config(fastpeft, n=3)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_frozen_tokens": 5}))
    base = models.make_llama()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ValueError, match="num_frozen_tokens must be <= num_virtual_tokens") as err:
        fastpeft.PeftModel.from_pretrained(base, tmp_path)
    assert "adapter_config.json" in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in base.state_dict().items())
