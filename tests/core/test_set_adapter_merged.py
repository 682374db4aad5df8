"""`set_adapter` on a model with merged adapters: HF PEFT 0.21 warns "Adapter cannot be set when the model is
merged. Unmerging the model first.", unmerges, then activates, so the output is base + the new adapter only.
Without the unmerge the merged adapter stays in the weights whatever is active (0.01-0.5 off here)."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft

import models

# (config class name, init options giving non-zero adapters, targets of the first / second adapter)
METHODS = [
    ("LoraConfig", {"init_lora_weights": False}),
    ("IA3Config", {"init_ia3_weights": False, "feedforward_modules": []}),
    ("LoHaConfig", {"init_weights": False}),
    ("LoKrConfig", {"init_weights": False}),
    ("OFTConfig", {"init_weights": False, "r": 4, "oft_block_size": 0}),
    ("VeraConfig", {"init_weights": False, "r": 4}),
]
WARNING = "Adapter cannot be set when the model is merged. Unmerging the model first."


def _two_adapters(lib, cls: str, options: dict):
    config = getattr(lib, cls)
    torch.manual_seed(0)
    model = lib.get_peft_model(models.make_llama(), config(target_modules=["q_proj", "v_proj"], **options))
    torch.manual_seed(1)
    model.add_adapter("b", config(target_modules=["q_proj", "v_proj"], **options))
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**models.llama_inputs()).logits


@pytest.mark.parametrize(("cls", "options"), METHODS, ids=[m[0] for m in METHODS])
def test_set_adapter_unmerges_first(cls, options):
    model = _two_adapters(fastpeft, cls, options)
    model.set_adapter("b")
    only_b = _logits(model)
    model.set_adapter("default")
    model.merge_adapter()
    stale = _logits(model)
    with pytest.warns(UserWarning, match=WARNING):
        model.set_adapter("b")
    assert model.get_model_status().merged_adapters == []
    assert model.active_adapters == ["b"]
    torch.testing.assert_close(_logits(model), only_b, atol=1e-5, rtol=0)
    assert (stale - only_b).abs().max() > 1e-3  # the merged adapter changes the output


def test_set_adapter_after_merge_equals_hf_peft():
    lora = {"init_lora_weights": False}
    ours, theirs = (_two_adapters(lib, "LoraConfig", lora) for lib in (fastpeft, peft))
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model.merge_adapter()
        with pytest.warns(UserWarning, match=WARNING):
            model.set_adapter("b")
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


def test_set_adapter_unknown_name_leaves_merged_model_unchanged():
    model = _two_adapters(fastpeft, "LoraConfig", {"init_lora_weights": False})
    model.merge_adapter()
    merged = _logits(model)
    with pytest.raises(ValueError, match="missing"):
        model.set_adapter("missing")
    assert model.get_model_status().merged_adapters == ["default"]
    torch.testing.assert_close(_logits(model), merged, atol=0, rtol=0)


def test_functional_set_adapter_unmerges_each_layer_first():
    from fastpeft.functional import set_adapter

    model = _two_adapters(fastpeft, "LoraConfig", {"init_lora_weights": False})
    model.set_adapter("b")
    only_b = _logits(model)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match=WARNING):
        set_adapter(model, "b")
    torch.testing.assert_close(_logits(model), only_b, atol=1e-5, rtol=0)
