"""transformers' adapter API (PeftAdapterMixin: load_adapter, add_adapter, set_adapter, enable
/ disable_adapters, active_adapters, get_adapter_state_dict, delete_adapter, save_pretrained) on fastpeft, HF
PEFT not installed.

Expected values come from fastpeft's own PeftModel (checked against HF PEFT in the main suite) and from
adapter folders HF PEFT wrote (tests_ecosystem/data, checked by
tests/integrations/test_ecosystem_fixtures.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastpeft

import models

HF_FOLDER = Path(__file__).resolve().parent / "data" / "hf_lora_llama"
INPUTS = models.llama_inputs()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def lora_config(**kwargs):
    return fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               init_lora_weights=False, **kwargs)


@pytest.fixture
def fastpeft_folder(tmp_path) -> Path:
    torch.manual_seed(5)
    model = models.perturb(fastpeft.get_peft_model(models.make_llama(), lora_config()), seed=5, scale=0.1)
    model.save_pretrained(str(tmp_path))
    return tmp_path


def _adapter_tensors(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if adapter in n.split(".")}


@pytest.mark.parametrize("which", ["fastpeft", "hf"])
def test_load_adapter_equals_peft_model_from_pretrained(which, fastpeft_folder):
    folder = fastpeft_folder if which == "fastpeft" else HF_FOLDER
    expected = logits(fastpeft.PeftModel.from_pretrained(models.make_llama(), str(folder)))
    model = models.make_llama()
    base = logits(model)
    # the new adapter's random init differs from the file: a loader writing nothing fails
    torch.manual_seed(1234)
    model.load_adapter(str(folder), adapter_name="x")
    stored = load_file(str(folder / "adapter_model.safetensors"))
    loaded = _adapter_tensors(model, "x")
    assert len(loaded) == len(stored)
    for key, value in stored.items():
        name = key.removeprefix("base_model.model.").replace(".weight", ".x.weight")
        assert torch.equal(loaded[name], value), name
    got = logits(model)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert model.active_adapters() == ["x"]


def test_load_adapter_with_dora(tmp_path):
    """DoRA's magnitude is `...lora_magnitude_vector` in files and `...lora_magnitude_vector.<adapter>.weight`
    in the model (as HF PEFT): transformers' loader renames it with fastpeft's rules."""
    torch.manual_seed(5)
    trained = models.perturb(fastpeft.get_peft_model(models.make_llama(), lora_config(use_dora=True)),
                             seed=5, scale=0.1)
    trained.save_pretrained(str(tmp_path))
    expected = logits(fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path)))
    model = models.make_llama()
    model.load_adapter(str(tmp_path), adapter_name="x")
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    magnitudes = [k for k in stored if k.endswith("lora_magnitude_vector")]
    assert magnitudes
    loaded = dict(model.named_parameters())
    for key in magnitudes:
        name = key.removeprefix("base_model.model.") + ".x.weight"
        assert torch.equal(loaded[name], stored[key]), name
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=1e-6)


def test_add_set_disable_enable_and_state_dict():
    model = models.make_llama()
    base = logits(model)
    torch.manual_seed(1)
    model.add_adapter(lora_config(), adapter_name="a")
    model.add_adapter(lora_config(), adapter_name="b")
    assert model.active_adapters() == ["b"]  # add_adapter activates the new adapter
    model.set_adapter("a")
    assert model.active_adapters() == ["a"]
    state = model.get_adapter_state_dict("a")
    assert sorted(state) == sorted(k.replace(".a.", ".") for k in _adapter_tensors(model, "a"))
    reference = fastpeft.get_peft_model(models.make_llama(), lora_config())  # same weights, a PeftModel
    fastpeft.set_peft_model_state_dict(reference, {f"base_model.model.{k}": v for k, v in state.items()},
                                       strict=True)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=1e-6)
    assert (logits(model) - base).abs().max() > 1e-2
    model.disable_adapters()
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=1e-6)


def test_set_adapter_trains_only_the_active_adapter():
    model = models.make_llama()
    model.add_adapter(lora_config(), adapter_name="a")
    model.add_adapter(lora_config(), adapter_name="b")
    model.set_adapter("a")
    grads = {n.split(".")[-2]: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    assert grads == {"a": True, "b": False}


def test_delete_adapter_removes_its_weights_and_config():
    model = models.make_llama()
    model.add_adapter(lora_config(), adapter_name="a")
    model.add_adapter(lora_config(), adapter_name="b")
    model.delete_adapter("a")
    assert not _adapter_tensors(model, "a") and _adapter_tensors(model, "b")
    assert list(model.peft_config) == ["b"]


def test_save_pretrained_writes_an_adapter_fastpeft_and_peft_model_load(tmp_path):
    model = models.make_llama()
    torch.manual_seed(2)
    model.add_adapter(lora_config(), adapter_name="default")
    models.perturb(model, seed=2, scale=0.1, wanted=lambda n: "lora_" in n)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    reloaded = fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path))
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-6, rtol=1e-6)


def test_load_adapter_with_trainable_tokens(tmp_path):
    """LoRA with trainable_token_indices: transformers renames the token rows through the wrapper's load
    map."""
    torch.manual_seed(3)
    config = lora_config(trainable_token_indices={"embed_tokens": [1, 5]})
    source = models.perturb(fastpeft.get_peft_model(models.make_llama(), config), seed=3, scale=0.1)
    source.save_pretrained(str(tmp_path))
    model = models.make_llama()
    torch.manual_seed(99)
    model.load_adapter(str(tmp_path), adapter_name="x")
    delta = model.get_submodule("model.embed_tokens.token_adapter").trainable_tokens_delta["x"]
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(delta,
                       stored["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"])
    torch.testing.assert_close(logits(model), logits(source), atol=1e-6, rtol=1e-6)
