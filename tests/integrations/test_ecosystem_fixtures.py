"""The HF-PEFT-written adapter folders in tests_ecosystem/data/ (used where HF PEFT is not installed) are what
the pinned HF PEFT writes today: same config, same tensors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hf_fixtures", ROOT / "tests_ecosystem" / "hf_fixtures.py")
hf_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_fixtures)


def _config(folder: Path) -> dict:
    data = json.loads((folder / "adapter_config.json").read_text())
    data["target_modules"] = sorted(data["target_modules"])  # HF PEFT writes a set: any order
    return data


@pytest.mark.parametrize("name", sorted(hf_fixtures.FIXTURES))
def test_stored_fixture_is_what_hf_peft_writes(name, tmp_path):
    hf_fixtures.FIXTURES[name](tmp_path)
    stored = hf_fixtures.DATA / name
    assert _config(tmp_path) == _config(stored)
    fresh, kept = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path, stored))
    assert sorted(fresh) == sorted(kept)
    assert all(torch.equal(fresh[k], kept[k]) for k in fresh)
