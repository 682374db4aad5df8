"""Rollback of loads into a model that already holds many adapters, and of injections into a model whose
modules share a parameter: the walks that record and freeze parameters read each module's own parameters
(core/transaction.py ModelState, core/tuner.py _freeze_base), so a parameter reached twice must still come
back with its original flag.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastpeft
from fastpeft.checkpoint import keys
from fastpeft.core.tuner import Tuner
from fastpeft.errors import AdapterLoadError
from state_helpers import assert_same_state, hf_saved, state_of

import models


class _Shared(nn.Module):
    """Two layers holding one weight (as a tied embedding / head pair)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lin1.weight = self.lin0.weight

    def forward(self, x):
        return self.lin1(self.lin0(x))


def test_a_failed_injection_gives_a_shared_parameter_its_flag_back(monkeypatch):
    model = _Shared()
    before = state_of(model)
    assert all(flag for _, flag in before["grads"])  # the freeze changes every flag, the shared one too

    def fail(self):
        raise RuntimeError("activation failed")

    monkeypatch.setattr(Tuner, "_apply_adapter_state", fail)  # after the base was frozen
    with pytest.raises(RuntimeError, match="activation failed"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["lin0"]))
    assert_same_state(model, before)
    assert model.lin0.weight.requires_grad and model.lin1.bias.requires_grad


def _missing_one_weight(src, dst):
    """A copy of the adapter folder `src` whose file lacks one lora_B weight."""
    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    dropped = next(k for k in tensors if "lora_B" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst


def test_a_failed_50th_load_leaves_all_earlier_adapters_as_they_were(tmp_path):
    path = hf_saved(tmp_path / "a")
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(path), is_trainable=True)
    for i in range(1, 49):
        model.load_adapter(str(path), f"a{i}", is_trainable=i % 7 == 0, low_cpu_mem_usage=i % 2 == 0)
    model.base_model.model.lin0.lora_A["a7"].weight.requires_grad_(True)  # set by hand: must stay
    model.base_model.model.lin0.lora_A["default"].weight.requires_grad_(False)
    model.train()
    inner = model.base_model.model
    inner.lin0.lora_dropout["a3"].eval()  # modes set by hand on leaves the failed load puts into train mode
    inner.lin0.lora_A["a5"].eval()
    before = state_of(model)
    assert sum(flag for _, flag in before["grads"]) > 1  # trainable flags that a failed load could lose
    bad = _missing_one_weight(path, tmp_path / "bad")
    with pytest.raises(AdapterLoadError, match="no values"):
        model.load_adapter(str(bad), "a49", is_trainable=True, low_cpu_mem_usage=True)
    assert_same_state(model, before)
    assert "a49" not in model.peft_config and not inner.lin0.lora_A["a5"].training
    # the model still takes the next load, which now works
    model.load_adapter(str(path), "a49")
    assert model.base_model.model.lin0.lora_A["a49"].weight.requires_grad is False


def test_a_load_after_a_module_swap_sees_the_new_module(tmp_path):
    path = hf_saved(tmp_path / "a")
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(path))
    model.load_adapter(str(path), "b")
    inner = model.base_model.model
    old = inner.lin1
    swapped = nn.Linear(old.base_layer.in_features, old.base_layer.out_features)
    swapped.load_state_dict(old.base_layer.state_dict())
    inner.lin1 = swapped  # the user replaces an adapted module by a plain one
    model.load_adapter(str(path), "c")
    assert isinstance(inner.lin1, type(old)) and inner.lin1 is not old
    assert inner.lin1.adapter_names() == {"c"}
    assert inner.lin0.adapter_names() == {"default", "b", "c"}


def test_a_reload_into_an_existing_adapter_failing_half_way_puts_its_values_back(tmp_path, monkeypatch):
    path = hf_saved(tmp_path / "a")
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(path))
    model.load_adapter(str(path), "a2")
    other = hf_saved(tmp_path / "other", seed=5)  # other values: the writes change something
    before = state_of(model)
    a2 = {id(p) for n, p in model.named_parameters() if ".a2." in n and ".lora_" in n}  # the leaves
    original, calls = keys.write_tensor, []

    def write_then_fail(target, value):
        changes = id(target) in a2 and not torch.equal(target, value.to(target.dtype))
        original(target, value)
        calls.append(changes)
        if sum(calls) == 2:  # two of a2's LoRA tensors hold the other file's values by now
            raise RuntimeError("write failed")

    monkeypatch.setattr(keys, "write_tensor", write_then_fail)
    with pytest.raises(AdapterLoadError, match="write failed"):
        model.load_adapter(str(other), "a2")
    assert sum(calls) == 2
    assert_same_state(model, before)
