"""Merging never applies dropout, random masks or sampling, whatever the mode.

Every mergeable row of tests/cases.py, with every dropout-like option of its config set > 0 (found from the
config class's fields, not a list), merged in *training* mode: the merged weights are HF PEFT's eval-mode
merge of the same adapter, both ways (HF file -> fastpeft merge, fastpeft file -> HF merge); two merges under
different seeds agree, and merge -> unmerge gives the base weights back. (HF PEFT 0.21.2 merges
deterministically in training mode too; fastpeft's BOFT drew its block dropout there until AdapterLayer.merge
/ unmerge ran in eval mode.) Flags, wrapping and adapter names: tests/safety/test_safety_adapters.py; merged
exports: tests/safety/test_safety_export.py.
"""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch

import fastpeft
from fastpeft import registry

from cases import METHOD_CASES
from models import MODELS, forward, perturb

MERGEABLE = [c for c in METHOD_CASES if c.mergeable]
DROPOUT = 0.5


def config_class(lib, name: str):
    if lib is peft:
        return getattr(peft, name)
    return next(s.config_cls for s in registry.registered().values() if s.config_cls.__name__ == name)


def dropout_fields(cls) -> list[str]:
    """The config's float options named like dropout (lora_dropout, rank_dropout, module_dropout, boft_dropout
    ...)."""
    return [f.name for f in dataclasses.fields(cls) if "dropout" in f.name and isinstance(f.default, float)]


def noisy_config(lib, case):
    """The row's config with every dropout-like option at DROPOUT."""
    kwargs = copy.deepcopy(case.kwargs)
    if "task_type" in kwargs:
        kwargs["task_type"] = getattr(lib.TaskType, kwargs["task_type"])
    cls = config_class(lib, case.method)
    kwargs.update({name: DROPOUT for name in dropout_fields(cls)})
    return cls(**kwargs)


def adapted(lib, case):
    torch.manual_seed(0)
    return perturb(lib.get_peft_model(MODELS[case.model][0](), noisy_config(lib, case)), 0, 0.1)


def merged_state(model, train: bool, seed: int) -> dict[str, torch.Tensor]:
    model.train(train)
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def assert_same_states(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5, msg=key)


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}


def test_dropout_fields_are_found():
    """The field scan sees the options it must set (a scan that finds nothing would test nothing)."""
    found = {name: dropout_fields(config_class(fastpeft, name)) for name in
             ("LoraConfig", "LoHaConfig", "LoKrConfig", "BOFTConfig", "VeraConfig")}
    assert found["LoraConfig"] == ["lora_dropout"]
    assert {"rank_dropout", "module_dropout"} <= set(found["LoHaConfig"]) & set(found["LoKrConfig"])
    assert found["BOFTConfig"] == ["boft_dropout"] and found["VeraConfig"] == ["vera_dropout"]


@pytest.mark.parametrize("case", [c for c in MERGEABLE if c.hf_oracle], ids=lambda c: c.id)
def test_training_mode_merge_of_hf_adapter_is_hf_eval_merge(case, tmp_path):
    theirs = adapted(peft, case).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path), is_trainable=True)
    assert_same_states(merged_state(ours, train=True, seed=1), merged_state(theirs, train=False, seed=0))


@pytest.mark.parametrize("case", [c for c in MERGEABLE if "unmerge" not in c.refused], ids=lambda c: c.id)
def test_training_mode_merge_is_deterministic_and_unmerge_restores(case, tmp_path):
    ours = adapted(fastpeft, case)
    inputs = MODELS[case.model][1]()
    expected = forward(ours.eval(), inputs)
    before = base_weights(ours)
    states = []
    for seed in (1, 2):
        ours.train()
        torch.manual_seed(seed)
        ours.merge_adapter()
        states.append(base_weights(ours))
        torch.manual_seed(seed + 10)
        ours.unmerge_adapter()
        for key, value in base_weights(ours).items():
            torch.testing.assert_close(value, before[key], atol=1e-5, rtol=1e-5, msg=f"unmerged {key}")
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-6, rtol=1e-6, msg=f"second merge {key}")
    ours.merge_adapter()
    torch.testing.assert_close(forward(ours.eval(), inputs), expected, atol=1e-4, rtol=1e-4)
    ours.unmerge_adapter()
    if case.hf_oracle:  # fastpeft's file, merged by HF PEFT in eval mode
        ours.save_pretrained(str(tmp_path))
        theirs = peft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path))
        assert_same_states(merged_state(ours, train=True, seed=3), merged_state(theirs, train=False, seed=0))
