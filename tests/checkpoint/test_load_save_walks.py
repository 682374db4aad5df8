"""Cheaper loads and saves keep their guarantees.

Loads copy only tensors that outlive a rollback (core/transaction.py: made before the load's record, and each
once): an adapter created by the failing load is dropped anyway, but a tensor it shares with an adapter that
existed before (VeRA's projections) must still get its old value back. Saves walk the model once for the
tensors and the base fingerprint; the files are checked against HF PEFT both ways and the fingerprint against
the one the tuner's own walk gives.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.checkpoint import fingerprint, keys
from fastpeft.core.transaction import Transaction
from fastpeft.errors import AdapterLoadError
from state_helpers import WEIGHTS, assert_same_state, state_of

import models

VERA = dict(r=4, target_modules=["lin0", "lin1"], save_projection=True)
LORA = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["head"])


def hf_vera(path: Path, prng_key: int, seed: int) -> Path:
    model = peft.get_peft_model(models.make_mlp(), peft.VeraConfig(**VERA, projection_prng_key=prng_key))
    models.perturb(model, seed, 0.3)
    model.save_pretrained(str(path))
    return path


def test_failed_load_of_new_adapter_restores_the_projections_it_shares(tmp_path):
    """The new VeRA adapter reuses the first adapter's projection tensors; its load writes the file's (other)
    projections into them, then fails on strict=True (an unexpected key): the first adapter's projections, and
    everything else, must be as before."""
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(hf_vera(tmp_path / "a", 0, 1)))
    other = hf_vera(tmp_path / "b", 0, 2)
    tensors = load_file(str(other / WEIGHTS))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + 1.0  # the load really writes other values
    tensors["base_model.model.act.vera_lambda_b"] = torch.ones(3)
    save_file(tensors, str(other / WEIGHTS), metadata={"format": "pt"})
    before = state_of(model)
    x = models.mlp_inputs()
    expected = models.forward(model, x)
    with pytest.raises(AdapterLoadError, match="strict=True"):
        model.load_adapter(str(other), "new", strict=True)
    assert_same_state(model, before)
    torch.testing.assert_close(models.forward(model, x), expected, atol=0, rtol=0)


def _copies(monkeypatch):
    """A counter of the tensors transactions copied (`keep_values`) since it was last read."""
    copied = [0]
    original = Transaction.keep_values

    def counted(self, tensors, device=None):
        before = len(self.root.values)
        original(self, tensors, device)
        copied[0] += len(self.root.values) - before

    monkeypatch.setattr(Transaction, "keep_values", counted)

    def read() -> int:
        count, copied[0] = copied[0], 0
        return count

    return read


def test_loads_copy_only_what_a_rollback_keeps(tmp_path, monkeypatch):
    theirs = peft.get_peft_model(models.make_mlp(), peft.LoraConfig(**LORA))
    models.perturb(theirs, 3, 0.3)
    theirs.save_pretrained(str(tmp_path / "hf"))
    copies = _copies(monkeypatch)
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "hf"))
    assert copies() == 0  # the adapter was created by this load: dropped on failure, nothing to copy
    ours.load_adapter(str(tmp_path / "hf"), "second")
    assert copies() == 0
    ours.load_adapter(str(tmp_path / "hf"), "second")  # into an existing adapter: each of its tensors, once
    assert copies() == len(keys.get_peft_model_state_dict(ours, adapter_name="second")) > 0
    keys.set_peft_model_state_dict(ours, load_file(str(tmp_path / "hf" / WEIGHTS)))  # outside any load
    assert copies() == len(keys.get_peft_model_state_dict(ours))
    x = models.mlp_inputs()
    torch.testing.assert_close(models.forward(ours, x), models.forward(theirs.eval(), x))


def test_save_with_one_walk_matches_hf_both_ways(tmp_path):
    ours = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(**LORA))
    models.perturb(ours, 4, 0.3)
    ours.add_adapter("other", fastpeft.LoraConfig(**{**LORA, "r": 2}))
    models.perturb(ours, 5, 0.3)
    ours.save_pretrained(str(tmp_path / "ours"))
    for name, sub in (("default", ""), ("other", "other")):
        folder = tmp_path / "ours" / sub
        with safe_open(str(folder / WEIGHTS), "pt") as f:
            stored = fingerprint.parse(f.metadata()[fingerprint.METADATA_KEY], folder)
        assert stored == fingerprint.compute(ours, name)  # the tuner's own walk gives the same entries
        assert sorted(stored["modules"]) == ["lin0", "lin1"]
        saved = load_file(str(folder / WEIGHTS))
        expected = keys.get_peft_model_state_dict(ours, adapter_name=name)
        assert sorted(saved) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(saved[key], value), key
    x = models.mlp_inputs()
    back = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "ours"))
    torch.testing.assert_close(models.forward(back, x), models.forward(ours.eval(), x))
    theirs = peft.get_peft_model(models.make_mlp(), peft.LoraConfig(**LORA))
    models.perturb(theirs, 6, 0.3)
    theirs.save_pretrained(str(tmp_path / "hf"))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "hf"))
    loaded.save_pretrained(str(tmp_path / "again"))
    hf_keys = load_file(str(tmp_path / "hf" / WEIGHTS))
    our_keys = load_file(str(tmp_path / "again" / WEIGHTS))
    assert sorted(hf_keys) == sorted(our_keys)
    for key, value in hf_keys.items():
        assert torch.equal(our_keys[key], value), key
