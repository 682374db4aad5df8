"""A layer's `set_adapter` writes requires_grad only where it changes and reads parameters without their
keys; after any sequence of loads and switches the flags and active lists must equal HF PEFT 0.21's rule:
set_adapter makes exactly the active adapters train (none with inference_mode), a load with
is_trainable=True adds the new adapter to the training ones although inactive, a frozen load changes
nothing else; the base never trains."""
from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.core.layer import AdapterLayer

import models


def _lora():
    return fastpeft.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False)


def _ia3():  # IA3 keeps its vectors as plain nn.Parameter items of an nn.ParameterDict
    return fastpeft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])


def _expected(layer: AdapterLayer, active: list[str], trainable: set[str]) -> dict[str, bool]:
    """The rule, computed from the keyed `adapter_parameters` (not the layer's key-less reader)."""
    return {f"{name}:{key}": name in trainable
            for name in sorted(layer.adapter_names()) for key, _ in layer.adapter_parameters(name)}


def _actual(layer: AdapterLayer) -> dict[str, bool]:
    return {f"{name}:{key}": p.requires_grad
            for name in sorted(layer.adapter_names()) for key, p in layer.adapter_parameters(name)}


def _check(pm, active: list[str], trainable: set[str]) -> None:
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 2
    for layer in layers:
        assert layer.active_adapters == active
        assert _actual(layer) == _expected(layer, active, trainable)
        assert not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("make_cfg", [_lora, _ia3], ids=["lora", "ia3"])
def test_flags_after_loads_and_switches_equal_the_plain_rule(tmp_path, make_cfg):
    torch.manual_seed(0)
    pm = fastpeft.get_peft_model(models.make_mlp(), make_cfg())
    pm.save_pretrained(tmp_path)
    _check(pm, ["default"], {"default"})
    # the trainable adapters after each load (HF PEFT 0.21 gives the same sets for this sequence)
    trains = [{"default", "a0"}, {"default", "a0"}, {"a1", "a2"}, {"a1", "a2"}, {"a1", "a2", "a4"}]
    for i in range(5):
        pm.load_adapter(tmp_path, adapter_name=f"a{i}", is_trainable=i % 2 == 0)
        _check(pm, ["default"] if i < 2 else ["a1"], trains[i])
        if i == 1:
            pm.base_model.set_adapter("a1")
            _check(pm, ["a1"], {"a1"})
    pm.base_model.set_adapter(["a2", "a4"])
    _check(pm, ["a2", "a4"], {"a2", "a4"})
    pm.base_model.set_adapter("a3", inference_mode=True)
    _check(pm, ["a3"], set())


def test_a_layer_call_trains_only_the_active_ones_it_is_asked_to(tmp_path):
    pm = fastpeft.get_peft_model(models.make_mlp(), _lora())
    pm.add_adapter("b", _lora())
    layer = pm.base_model.model.lin0
    # a flag set by hand on an inactive adapter is put back by the next call
    next(p for _, p in layer.adapter_parameters("b")).requires_grad_(True)
    layer.set_adapter(["default"], trainable=["default", "b"])
    assert _actual(layer) == _expected(layer, ["default"], {"default"})  # b is asked to train but inactive
    assert any(_actual(layer).values()) and not all(_actual(layer).values())
    layer.set_adapter(["default", "b"], inference_mode=True)
    assert not any(_actual(layer).values())
    layer.set_adapter(["b"])
    assert _actual(layer) == _expected(layer, ["b"], {"b"})
