"""The module walks of a load (core/module_walk.py): the same modules, names and order as torch's
`named_modules`, and with `adapter=` the per-adapter entries of adapter layers only for that adapter (what the
load of one adapter reads: holders, targets, its own key map, the size bound).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.checkpoint import config_values
from fastpeft.core import module_walk

import models


def _with_adapters(n: int = 3):
    """A Llama with LoRA adapters a0..a{n-1} and a modules_to_save head wrapper, plus a shared module."""
    model = models.make_llama()
    config = dict(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.1)
    peft_model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**config), adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", fastpeft.LoraConfig(**config))
    inner = peft_model.base_model.model.model
    inner.shared_twice = inner.layers[0].self_attn.q_proj  # reached by two paths
    return peft_model


@pytest.mark.parametrize("remove_duplicate", [True, False])
def test_the_full_walk_is_torchs(remove_duplicate):
    model = _with_adapters()
    assert module_walk.named_modules(model, remove_duplicate=remove_duplicate) == \
        list(model.named_modules(remove_duplicate=remove_duplicate))
    assert {id(m) for m in module_walk.all_modules(model)} == {id(m) for m in model.modules()}
    assert len(module_walk.all_modules(model)) == len(list(model.modules()))


def _is_entry_of(name: str, adapter: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("lora_") and i + 1 < len(parts) and parts[i + 1] == adapter
               for i, p in enumerate(parts))


@pytest.mark.parametrize("adapter", ["a1", None])
def test_a_pruned_walk_leaves_out_exactly_the_other_adapters_entries(adapter):
    model = _with_adapters()
    full = list(model.named_modules())
    others = [a for a in ("a0", "a1", "a2") if a != adapter]
    expected = [(n, m) for n, m in full if not any(_is_entry_of(n, a) for a in others)]
    pruned = module_walk.named_modules(model, adapter=adapter)
    assert pruned == expected
    assert len(full) - len(pruned) >= 2 * 3 * len(others)  # A, B and dropout per layer (2 q/v layers)
    # the modules_to_save wrapper is no adapter layer: its per-adapter copies stay in
    assert any(n.endswith("lm_head.modules_to_save.a0") for n, _ in pruned)


def test_the_size_bound_is_the_base_models():
    model = _with_adapters()
    wide = fastpeft.LoraConfig(r=2000, target_modules=["q_proj"])  # factors wider than any base weight
    model.add_adapter("wide", wide)
    base_only = models.make_llama()
    assert config_values.model_size_bound(model.get_base_model()) == config_values.model_size_bound(base_only)
    assert config_values.matrix_size_bound(model.get_base_model()) == \
        config_values.matrix_size_bound(base_only)
    big = max(p.numel() for p in base_only.parameters())
    assert config_values.matrix_size_bound(base_only) == max(big, 1024)


def test_eval_after_a_load_runs_only_where_a_module_trains(monkeypatch):
    model = _with_adapters()
    model.eval()
    calls = models.count_calls(monkeypatch, nn.Module, "eval")
    module_walk.to_eval(model)
    assert calls["n"] == 0
    model.base_model.model.model.layers[1].self_attn.v_proj.lora_dropout["a2"].train()  # one leaf trains
    module_walk.to_eval(model)
    assert calls["n"] == 1 and not any(m.training for m in model.modules())


def test_a_load_into_a_model_in_train_mode_leaves_it_in_eval_mode(tmp_path):
    model = _with_adapters(1)
    model.save_pretrained(tmp_path)
    model.train()
    model.load_adapter(str(tmp_path / "a0"), "again")  # a non-default adapter is saved in its subfolder
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        model(**models.llama_inputs())
