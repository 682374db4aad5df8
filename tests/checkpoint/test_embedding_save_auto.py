"""`save_embedding_layers="auto"` with a resized vocabulary: HF PEFT 0.21 compares the model's vocab_size with
the base model's config.json (`base_model_name_or_path`) and saves the input / output embeddings when they
differ; without them the file cannot rebuild the model (the new rows are random in every fresh resize)."""

from __future__ import annotations

import peft
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fastpeft

import models


def _resized(folder, seed: int):
    base = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    base.resize_token_embeddings(110, mean_resizing=False)
    return base


def _saved(lib, base, folder):
    model = lib.get_peft_model(base, lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    model.save_pretrained(folder)
    return model, load_file(f"{folder}/adapter_model.safetensors")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 2, 105, 108, 3]])).logits


def test_resized_vocab_saves_embeddings_as_hf_peft(tmp_path):
    models.make_llama().save_pretrained(tmp_path / "base")
    ours, our_file = _saved(fastpeft, _resized(tmp_path / "base", 0), tmp_path / "ours")
    _, their_file = _saved(peft, _resized(tmp_path / "base", 0), tmp_path / "theirs")
    embedding_keys = {k for k in their_file if "embed_tokens" in k or "lm_head" in k}
    assert embedding_keys  # HF PEFT saves them here
    assert set(our_file) == set(their_file)
    reloaded = fastpeft.PeftModel.from_pretrained(_resized(tmp_path / "base", 1), tmp_path / "ours")
    torch.testing.assert_close(_logits(reloaded), _logits(ours), atol=0, rtol=0)
    # not vacuous: a fresh resize has other rows for the new tokens
    assert (_logits(_resized(tmp_path / "base", 1)) - _logits(ours.get_base_model())).abs().max() > 1e-3


def test_unresized_vocab_saves_no_embeddings(tmp_path):
    models.make_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    _, state = _saved(fastpeft, base, tmp_path / "ours")
    assert not [k for k in state if "embed_tokens" in k or "lm_head" in k]
