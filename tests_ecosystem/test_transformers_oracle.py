"""The same transformers call with HF PEFT underneath (the oracle, run by the dev venv's Python in a
subprocess so the two `peft` packages never meet) and with fastpeft underneath give the same logits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import models

ROOT = Path(__file__).resolve().parent.parent
ORACLE_PYTHON = os.environ.get("ORACLE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
HF_FOLDER = Path(__file__).resolve().parent / "data" / "hf_lora_llama"

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import peft, models
assert peft.__version__ == "0.21.2", peft.__version__
model = models.make_llama()
torch.manual_seed(1234)
model.load_adapter({folder!r}, adapter_name="x")
with torch.no_grad():
    torch.save(model(**models.llama_inputs()).logits, {out!r})
"""


def _oracle_logits(folder: Path, out: Path) -> torch.Tensor:
    if not Path(ORACLE_PYTHON).exists():
        pytest.fail(f"the oracle's Python {ORACLE_PYTHON} is missing: run `make install` (the "
                    "dev venv has HF PEFT)")
    code = SCRIPT.format(tests=str(ROOT / "tests"), folder=str(folder), out=str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([ORACLE_PYTHON, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_load_adapter_equals_transformers_on_hf_peft(tmp_path):
    expected = _oracle_logits(HF_FOLDER, tmp_path / "logits.pt")
    model = models.make_llama()
    base = model(**models.llama_inputs()).logits.detach()
    torch.manual_seed(1234)
    model.load_adapter(str(HF_FOLDER), adapter_name="x")
    with torch.no_grad():
        got = model(**models.llama_inputs()).logits
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
