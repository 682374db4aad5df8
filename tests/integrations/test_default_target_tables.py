"""The per-model default `target_modules` tables (`peft.utils.constants` names, used when a config names no
targets): every entry of HF PEFT's tables is in fastpeft's with the same value, so a model type HF PEFT
adapts by default fastpeft adapts the same way (fastpeft's few extra model types are allowed)."""

from __future__ import annotations

import peft.utils.constants as hf_constants
import pytest

import fastpeft.utils.constants as constants
from fastpeft.integrations.transformers_defaults import default_targets

TABLES = [n for n in constants.__all__
          if n.startswith("TRANSFORMERS_MODELS_TO_") and ("TARGET" in n or "FEEDFORWARD" in n)]


def test_every_hf_table_is_exported():
    theirs = {n for n in dir(hf_constants) if n.startswith("TRANSFORMERS_MODELS_TO_")}
    # per-model converters of prefix-tuning caches: fastpeft's prefix tuning shapes its cache itself
    assert sorted(theirs - set(TABLES)) == ["TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING"]


@pytest.mark.parametrize("name", TABLES)
def test_every_hf_entry_is_there_with_its_value(name):
    ours, theirs = getattr(constants, name), getattr(hf_constants, name)
    assert sorted(set(theirs) - set(ours)) == []
    assert {k: v for k, v in theirs.items() if ours[k] != v} == {}


class _Config:
    def __init__(self, model_type):
        self.model_type = model_type


class _Model:
    def __init__(self, model_type):
        self.config = _Config(model_type)


@pytest.mark.parametrize("name", TABLES)
def test_a_regex_entry_stays_one_string(name):
    table = getattr(constants, name)
    for model_type, value in table.items():
        got = default_targets(table, _Model(model_type), "m")
        assert got == (value if isinstance(value, str) else set(value)), model_type
