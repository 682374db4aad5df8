"""Prompt-method generate() under the ways users set generation options: the call's keywords, a
GenerationConfig passed in, or the model's own generation_config (as read from generation_config.json)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GenerationConfig

from greedy_reference import greedy_reference
from prompt_helpers import adapted

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["prompt_tuning", "p_tuning_mlp", "prefix", "cpt"]
IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["keyword", "generation_config", "model_default"])
def test_max_length_counts_the_callers_ids(method, where):
    """max_length = 14 means 14 tokens in the returned rows (the 6 given + 8 new), wherever it is set, and
    those 8 are greedy decoding's (virtual tokens never count)."""
    model, extra = adapted("llama", method)
    kwargs = {"pad_token_id": 0, "do_sample": False}
    if where == "keyword":
        kwargs["max_length"] = 14
    elif where == "generation_config":
        kwargs = {"generation_config": GenerationConfig(max_length=14, pad_token_id=0, do_sample=False)}
    else:
        model.get_base_model().generation_config.max_length = 14
    got = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kwargs, **extra)
    assert got.shape == (2, 14)
    expected = greedy_reference(model, IDS, torch.ones_like(IDS), max_new_tokens=8, row_kwargs=extra or None,
                                pad_token_id=0)
    assert torch.equal(got, expected)


def test_prefix_generation_config_sets_the_cache_copies():
    """Beams and several returned sequences given through a GenerationConfig: one cached prefix per row
    generate() runs, the same result as with keywords."""
    model, _ = adapted("llama", "prefix")
    settings = {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 4, "pad_token_id": 0}
    by_config = model.generate(input_ids=IDS, generation_config=GenerationConfig(**settings))
    by_keywords = model.generate(input_ids=IDS, **settings)
    assert by_config.shape == (6, 10) and torch.equal(by_config, by_keywords)


@pytest.mark.parametrize("how", ["keyword", "generation_config"])
def test_prefix_use_cache_false_is_overridden_and_said(how, caplog):
    model, _ = adapted("llama", "prefix")
    settings = {"max_new_tokens": 4, "pad_token_id": 0, "use_cache": False}
    kwargs = settings if how == "keyword" else {"generation_config": GenerationConfig(**settings)}
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        got = model.generate(input_ids=IDS, **kwargs)
    assert "use_cache=True" in caplog.text
    assert torch.equal(got, greedy_reference(model, IDS, torch.ones_like(IDS), max_new_tokens=4,
                                             pad_token_id=0))


@pytest.mark.parametrize("base_name", ["llama", "t5"])
def test_prefix_positions_for_older_generate(base_name):
    """transformers < 5.2 takes cache positions from the caller: they start after the n cached prefix tokens,
    and an encoder-decoder's encoder runs here without them (its relative positions start at 0)."""
    from fastpeft.methods.prefix_tuning.model import _legacy_positions

    model, _ = adapted(base_name, "prefix")
    base, config = model.get_base_model(), model.peft_config["default"]
    kwargs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    _legacy_positions(base, config, kwargs, IDS[:, :3], 4)
    assert kwargs["cache_position"].tolist() == [4, 5, 6]
    if base_name == "t5":
        expected = base.get_encoder()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).last_hidden_state
        assert torch.equal(kwargs["encoder_outputs"].last_hidden_state, expected)
    else:
        assert "encoder_outputs" not in kwargs
