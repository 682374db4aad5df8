"""The README's ecosystem examples (examples/*.py) run where HF PEFT is not installed, and every check they
print holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["transformers_adapters.py", "diffusers_lora.py", "trl_sft.py"])
def test_example_runs_and_its_checks_hold(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    checks = [line for line in result.stdout.splitlines() if line.endswith((": True", ": False"))]
    assert not [line for line in checks if line.endswith("False")], result.stdout
    if script == "trl_sft.py":
        assert "'adapter_model.safetensors'" in result.stdout and "'model.safetensors'" not in result.stdout
    else:
        assert len(checks) >= 3, result.stdout
