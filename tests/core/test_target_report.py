"""HF PEFT's `targeted_module_names` / `targeted_parameter_names` (tuner attributes, reached from the
PeftModel too): which modules / parameters the adapters were put on. fastpeft lists them in module order."""

from __future__ import annotations

import peft

import fastpeft
from moe_helpers import make_mixtral

import models


def _report(model) -> tuple[set[str], set[str]]:
    return set(model.targeted_module_names), set(model.base_model.targeted_parameter_names)


def test_targeted_module_names_equal_hf_peft():
    def build(lib):
        config = lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        model = lib.get_peft_model(models.make_llama(), config)
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["k_proj"], layers_to_transform=[0]))
        return model

    ours, theirs = build(fastpeft), build(peft)
    assert _report(ours) == _report(theirs)
    assert len(ours.targeted_module_names) == 5 and ours.base_model.targeted_parameter_names == []


def test_targeted_parameter_names_equal_hf_peft():
    def build(lib):
        config = lib.LoraConfig(r=2, target_modules=["q_proj"],
                                target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        return lib.get_peft_model(make_mixtral(), config)

    ours, theirs = build(fastpeft), build(peft)
    assert _report(ours) == _report(theirs)
    assert len(ours.base_model.targeted_parameter_names) == 4  # 2 layers x 2 expert parameters
