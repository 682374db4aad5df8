"""Base-model fingerprint (a fastpeft extension): saved in the safetensors metadata, invisible to HF PEFT,
checked on load. Same base (any dtype) -> silent; different weights or shapes -> a warning naming the modules
(strict=True: AdapterLoadError, model untouched); no fingerprint where the saved base is not the one to load
onto."""

from __future__ import annotations

import json
import logging
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.checkpoint import fingerprint
from fastpeft.errors import AdapterLoadError

import models

WEIGHTS = "adapter_model.safetensors"
LOGGER = "fastpeft.checkpoint.fingerprint"


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=what)


def _lora(base=None, **extra):
    config = fastpeft.LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False, **extra)
    return fastpeft.get_peft_model(base or models.make_mlp(), config).eval()


def _stored(folder) -> dict | None:
    with safe_open(str(folder / WEIGHTS), "pt") as fh:
        text = (fh.metadata() or {}).get(fingerprint.METADATA_KEY)
    return None if text is None else json.loads(text)


def _other_base():
    base = models.make_mlp()
    with torch.no_grad():
        base.lin1.weight.add_(0.05)
    return base


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_saved_in_metadata_and_hf_loads_silently_both_ways(tmp_path, caplog):
    model = _lora()
    expected = models.forward(model, models.mlp_inputs())
    model.save_pretrained(str(tmp_path / "ours"))
    stored = _stored(tmp_path / "ours")
    assert sorted(stored["modules"]) == ["lin0", "lin1"]
    assert stored["modules"]["lin0"]["shape"] == [20, 10]
    assert len(json.dumps(stored)) < 600  # small: a few numbers per module
    assert "fastpeft_base_fingerprint" not in json.loads(
        (tmp_path / "ours" / "adapter_config.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "ours")).eval()
    assert [str(w.message) for w in caught
            if "fingerprint" in str(w.message) or "Unexpected" in str(w.message)] == []
    close(models.forward(theirs, models.mlp_inputs()), expected, "fastpeft file -> HF")
    theirs.save_pretrained(str(tmp_path / "hf"))
    assert _stored(tmp_path / "hf") is None  # HF PEFT's files carry none: never checked
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = fastpeft.PeftModel.from_pretrained(_other_base(), str(tmp_path / "hf")).eval()
    assert _warnings(caplog) == []
    close(models.forward(ours, models.mlp_inputs()),
          models.forward(theirs.__class__.from_pretrained(_other_base(), str(tmp_path / "hf")).eval(),
                         models.mlp_inputs()), "HF file -> fastpeft on any base")


def test_same_base_any_dtype_is_silent(tmp_path, caplog):
    _lora().save_pretrained(str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "a"))
        fastpeft.PeftModel.from_pretrained(models.make_mlp().to(torch.bfloat16), str(tmp_path / "a"))
        fastpeft.PeftModel.from_pretrained(models.make_mlp().double(), str(tmp_path / "a"), strict=True)
    assert _warnings(caplog) == []


def test_different_base_warns_naming_the_modules(tmp_path, caplog):
    model = _lora()
    model.save_pretrained(str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = fastpeft.PeftModel.from_pretrained(_other_base(), str(tmp_path / "a")).eval()
    (message,) = _warnings(caplog)
    assert "1 of 2 targeted modules differ" in message and "lin1" in message and "lin0:" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fastpeft.PeftModel.from_pretrained(_other_base().to(torch.bfloat16), str(tmp_path / "a"))
    assert len(_warnings(caplog)) == 1  # a dtype change does not hide different weights
    # the warning does not stop the load: the adapter tensors are the saved ones
    for name, tensor in load_file(str(tmp_path / "a" / WEIGHTS)).items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_strict_refuses_a_different_base_and_leaves_it_untouched(tmp_path):
    _lora().save_pretrained(str(tmp_path / "a"))
    base = _other_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=r"lin1: different weights.*strict mode refuses it"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"), strict=True)
    assert sorted(base.state_dict()) == sorted(before)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    wrapped = _lora(_other_base())
    with pytest.raises(AdapterLoadError, match="different base model"):
        wrapped.load_adapter(str(tmp_path / "a"), adapter_name="other", strict=True)
    assert list(wrapped.peft_config) == ["default"]


def test_check_through_existing_adapter_layers(tmp_path, caplog):
    _lora().save_pretrained(str(tmp_path / "a"))
    wrapped = _lora()  # lin0 / lin1 already LoRA layers
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        wrapped.load_adapter(str(tmp_path / "a"), adapter_name="second")
    assert _warnings(caplog) == []
    assert fingerprint.check_fingerprint(wrapped.get_base_model(), str(tmp_path / "a"), "x") == {}
    found = fingerprint.check_fingerprint(_other_base(), str(tmp_path / "a"), "x")
    assert sorted(found) == ["lin1"]


def test_shape_and_missing_module_reported(tmp_path):
    _lora().save_pretrained(str(tmp_path / "a"))
    wider = models.MLP(hidden=24)
    found = fingerprint.check_fingerprint(wider, str(tmp_path / "a"), "default")
    assert found == {"lin0": "shape [24, 10], saved with [20, 10]",
                     "lin1": "shape [24, 24], saved with [20, 20]"}
    renamed = torch.nn.Sequential()
    renamed.add_module("lin0", torch.nn.Linear(10, 20))
    assert (fingerprint.check_fingerprint(renamed, str(tmp_path / "a"), "default")["lin1"]
            == "not in this model")


def test_transformers_model_and_second_adapter_folder(tmp_path, caplog):
    config = fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=2)
    model = fastpeft.get_peft_model(models.make_llama(), config)
    model.add_adapter("extra", fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["o_proj"], r=2))
    model.save_pretrained(str(tmp_path / "a"))
    assert len(_stored(tmp_path / "a")["modules"]) == 4
    assert sorted(_stored(tmp_path / "a" / "extra")["modules"]) == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    other = models.make_llama()
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.mul_(-1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = fastpeft.PeftModel.from_pretrained(other, str(tmp_path / "a"))
        assert _warnings(caplog) == []
        loaded.load_adapter(str(tmp_path / "a" / "extra"), adapter_name="extra")
    (message,) = _warnings(caplog)
    assert "model.layers.1.self_attn.o_proj" in message and "layers.0" not in message


def test_merged_layers_are_not_fingerprinted(tmp_path, caplog):
    model = _lora()
    model.merge_adapter()
    model.save_pretrained(str(tmp_path / "merged"))
    assert _stored(tmp_path / "merged") is None  # the base weights hold the adapter: nothing to compare
    model.unmerge_adapter()
    model.save_pretrained(str(tmp_path / "unmerged"))
    assert sorted(_stored(tmp_path / "unmerged")["modules"]) == ["lin0", "lin1"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "merged"))
    assert _warnings(caplog) == []


def test_base_rewriting_init_is_not_fingerprinted(tmp_path, caplog):
    """PiSSA rewrites the base; loading re-runs it on the original base, so a fingerprint would be wrong."""
    config = fastpeft.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights="pissa")
    model = fastpeft.get_peft_model(models.make_mlp(), config).eval()
    expected = models.forward(model, models.mlp_inputs())
    model.save_pretrained(str(tmp_path / "pissa"))
    assert _stored(tmp_path / "pissa") is None
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "pissa")).eval()
    assert _warnings(caplog) == []
    close(models.forward(ours, models.mlp_inputs()), expected, "PiSSA reload")
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "pissa")).eval()
    close(models.forward(theirs, models.mlp_inputs()), expected, "PiSSA file -> HF")


@pytest.mark.parametrize("text", ["not json", '{"version": 1}', '{"version": 9, "modules": {}}',
                                  '{"version": 1, "modules": {"lin0": {"shape": "x"}}}', "[" * 5000])
def test_malformed_fingerprint_is_ignored_with_a_warning(tmp_path, caplog, text):
    expected = _lora()
    expected.save_pretrained(str(tmp_path / "a"))
    tensors = load_file(str(tmp_path / "a" / WEIGHTS))
    save_file(tensors, str(tmp_path / "a" / WEIGHTS),
              metadata={"format": "pt", fingerprint.METADATA_KEY: text})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = fastpeft.PeftModel.from_pretrained(_other_base(), str(tmp_path / "a"), strict=True)
    assert any("unreadable base-model fingerprint" in m for m in _warnings(caplog))
    assert loaded.peft_config["default"].r == 4


def test_entry_reads_a_strided_sample_of_any_layout():
    weight = torch.randn(300, 70)
    a = fingerprint.module_entry(torch.nn.Linear(70, 300).requires_grad_(False).to(torch.float32))
    assert a["shape"] == [300, 70]
    linear = torch.nn.Linear(70, 300)
    # non-contiguous view: no full copy needed
    linear.weight = torch.nn.Parameter(weight.t().contiguous().t())
    plain = torch.nn.Linear(70, 300)
    plain.weight = torch.nn.Parameter(weight.clone())
    assert fingerprint.module_entry(linear) == fingerprint.module_entry(plain)
    assert fingerprint.entry_difference(
        fingerprint.module_entry(plain), fingerprint.module_entry(linear)) is None
    plain.weight.data[0, 0] += 1.0  # index 0 is always sampled
    assert fingerprint.entry_difference(fingerprint.module_entry(linear), fingerprint.module_entry(plain))


def test_layers_merged_at_load_time_are_not_judged(tmp_path, caplog):
    _lora().save_pretrained(str(tmp_path / "a"))
    model = _lora(models.make_mlp())
    model.merge_adapter()  # lin0 / lin1 weights now hold the 'default' adapter
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model.load_adapter(str(tmp_path / "a"), adapter_name="second")
    assert _warnings(caplog) == []
    model.unmerge_adapter()
    assert fingerprint.check_fingerprint(model.get_base_model(), str(tmp_path / "a"), "second") == {}


def test_entry_of_scalar_and_one_dimensional_weights():
    holder = torch.nn.Module()
    holder.register_parameter("scale", torch.nn.Parameter(torch.tensor(3.0)))
    assert fingerprint.module_entry(holder) == {"shape": [], "dtype": "float32", "sum": 3.0,
                                                "abs": 3.0, "alt": 3.0}
    norm = torch.nn.LayerNorm(5)
    assert fingerprint.module_entry(norm)["sum"] == 5.0
    quantised_like = torch.nn.Module()
    quantised_like.register_parameter("weight", torch.nn.Parameter(torch.ones(3, 2, dtype=torch.int8),
                                                                   requires_grad=False))
    assert fingerprint.module_entry(quantised_like) is None  # not floating point: not sampled


def test_process_strict_mode_refuses_too(tmp_path):
    from fastpeft.core.checks import strict

    _lora().save_pretrained(str(tmp_path / "a"))
    with strict(), pytest.raises(AdapterLoadError, match="different base model"):
        fastpeft.PeftModel.from_pretrained(_other_base(), str(tmp_path / "a"))
    with strict():
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "a"))  # the same base loads


def test_layers_whose_base_weight_the_file_carries_are_not_fingerprinted(tmp_path, caplog):
    """LoRA on a resized embed_tokens / lm_head saves their base weights with the adapter (as HF PEFT): a load
    writes them, so a freshly resized base (other new rows) fits; the other targets are still checked."""
    def resized(seed):
        base = models.make_llama()
        torch.manual_seed(seed)
        base.resize_token_embeddings(110, mean_resizing=False)
        return base

    config = fastpeft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens", "lm_head"],
                                 init_lora_weights=False)
    fastpeft.get_peft_model(resized(0), config).save_pretrained(tmp_path)
    stored = fingerprint.stored_fingerprint(str(tmp_path))["modules"]
    assert any("q_proj" in name for name in stored)
    assert not [name for name in stored if "embed_tokens" in name or "lm_head" in name]
    with caplog.at_level(logging.WARNING):
        fastpeft.PeftModel.from_pretrained(resized(1), str(tmp_path), strict=True)
    assert "different base" not in caplog.text
