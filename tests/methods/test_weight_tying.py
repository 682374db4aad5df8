"""`ensure_weight_tying` with tied embeddings in modules_to_save / target_modules, against HF PEFT.

HF PEFT 0.21 gives the adapter to the input embedding and makes the tied LM head share it (the same trained
copy, or LoRA factors sharing storage). Outputs, config rewrites and files must agree both ways; merging is
exact here (HF PEFT merges the shared LoRA delta twice for tied target_modules, so its merge is not the oracle
there).
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft

IDS = torch.tensor([[1, 5, 7, 9, 3, 2], [4, 8, 15, 16, 23, 42]])

CASES = {
    "save-embed": dict(modules_to_save=["embed_tokens"], target_modules=["q_proj"]),
    "save-head": dict(modules_to_save=["lm_head"], target_modules=["q_proj"]),
    "target-embed": dict(target_modules=["embed_tokens", "q_proj"]),
    "target-head": dict(target_modules=["lm_head", "q_proj"]),
    "target-regex": dict(target_modules=r".*(q_proj|embed_tokens)"),
}


def make_llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager", tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def config(lib, case: str):
    return lib.LoraConfig(r=4, lora_alpha=8, ensure_weight_tying=True, init_lora_weights=False,
                          task_type="CAUSAL_LM", **CASES[case])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_step(model) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _listed(value):
    return sorted(value) if isinstance(value, (list, set)) else value


@pytest.mark.parametrize("case", list(CASES))
def test_config_rewrite_matches_hf(case):
    ours = fastpeft.get_peft_model(make_llama_tied(), config(fastpeft, case)).peft_config["default"]
    theirs = peft.get_peft_model(make_llama_tied(), config(peft, case)).peft_config["default"]
    assert _listed(ours.modules_to_save) == _listed(theirs.modules_to_save)
    assert _listed(ours.target_modules) == _listed(theirs.target_modules)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_and_matches(case, tmp_path):
    theirs = peft.get_peft_model(make_llama_tied(), config(peft, case))
    train_step(theirs)
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.PeftModel.from_pretrained(make_llama_tied(), tmp_path)
    assert not torch.allclose(logits(ours), logits(make_llama_tied()), atol=1e-4)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_our_files_load_in_hf_and_match_hf_files(case, tmp_path):
    ours = fastpeft.get_peft_model(make_llama_tied(), config(fastpeft, case))
    train_step(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_llama_tied(), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_sd = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_sd = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key, value in theirs_sd.items():
        torch.testing.assert_close(ours_sd[key], value, msg=key)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["ensure_weight_tying"] is True


@pytest.mark.parametrize("case", list(CASES))
def test_head_stays_tied_through_training(case):
    model = fastpeft.get_peft_model(make_llama_tied(), config(fastpeft, case))
    for _ in range(2):
        train_step(model)
    inner = model.base_model.model
    emb, head = inner.model.embed_tokens, inner.lm_head
    if "save" in case:
        assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
        trained = [n for n, p in model.named_parameters() if p.requires_grad and "q_proj" not in n]
        assert trained == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    else:
        a, b = emb.lora_weights("default")
        torch.testing.assert_close(head.delta_weight("default"), emb.delta_weight("default"),
                                   atol=1e-6, rtol=0)
        assert head.lora_A["default"].weight.data_ptr() == b.data_ptr()
        assert head.lora_B["default"].weight.data_ptr() == a.data_ptr()


@pytest.mark.parametrize("case", list(CASES))
def test_merge_is_exact_and_keeps_the_tie(case):
    model = fastpeft.get_peft_model(make_llama_tied(), config(fastpeft, case))
    train_step(model)
    before = logits(model)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged), before, atol=1e-4, rtol=1e-4)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    unloaded = model.unload()
    assert unloaded.lm_head.weight is unloaded.model.embed_tokens.weight


def test_merge_then_unmerge_restores_the_shared_weight():
    model = fastpeft.get_peft_model(make_llama_tied(), config(fastpeft, "target-head"))
    train_step(model)
    weight = model.base_model.model.model.embed_tokens.get_base_layer().weight
    original = weight.detach().clone()
    model.merge_adapter()
    assert not torch.allclose(weight, original)
    model.unmerge_adapter()
    torch.testing.assert_close(weight, original, atol=1e-6, rtol=0)


def test_second_adapter_is_tied_too(tmp_path):
    model = fastpeft.get_peft_model(make_llama_tied(), config(fastpeft, "target-embed"))
    model.add_adapter("other", config(fastpeft, "target-embed"))
    model.set_adapter("other")
    train_step(model)
    inner = model.base_model.model
    torch.testing.assert_close(inner.lm_head.delta_weight("other"),
                               inner.model.embed_tokens.delta_weight("other"))
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    theirs = peft.PeftModel.from_pretrained(make_llama_tied(), str(tmp_path / "other"))
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=1e-5)


def test_untied_model_warns_and_adapts_normally():
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                      tie_word_embeddings=False))
    with pytest.warns(UserWarning, match="no tied word embeddings"):
        model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, target_modules=["wte", "c_attn"],
                                                                   ensure_weight_tying=True))
    assert model.peft_config["default"].target_modules == {"wte", "c_attn"}
