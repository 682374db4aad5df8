"""get_model_status / get_layer_status report the same as HF PEFT's in several states."""

from __future__ import annotations

import dataclasses

import peft
import pytest

import fastpeft

from models import make_llama


def _model(lib):
    model = lib.get_peft_model(make_llama(),
                               lib.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.add_adapter("b", lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model


def _merge(model):
    model.merge_adapter()


def _disable_one_layer(model):
    model.base_model.model.model.layers[1].self_attn.v_proj.enable_adapters(False)


def _both_active(model):
    model.base_model.set_adapter(["default", "b"])


def _irregular_grads(model):
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad_(False)


STATES = {"fresh": lambda m: None, "merged": _merge, "one-layer-disabled": _disable_one_layer,
          "both-active": _both_active, "irregular-grads": _irregular_grads}


def _normalised(status) -> dict:
    data = dataclasses.asdict(status)
    return {k: (dict(sorted(v.items())) if isinstance(v, dict) else v) for k, v in data.items()}


@pytest.mark.parametrize("state", STATES)
def test_status_matches_hf(state):
    ours, theirs = _model(fastpeft), _model(peft)
    STATES[state](ours)
    STATES[state](theirs)
    assert _normalised(ours.get_model_status()) == _normalised(theirs.get_model_status())
    ours_layers = [_normalised(s) for s in ours.get_layer_status()]
    theirs_layers = [_normalised(s) for s in theirs.get_layer_status()]
    assert ours_layers == theirs_layers
    assert _normalised(fastpeft.get_model_status(ours)) == _normalised(peft.get_model_status(theirs))
