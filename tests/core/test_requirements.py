"""`make test` fails, naming the version, when HF PEFT (the oracle) is missing or not the pinned one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from requirements import CONSTRAINTS, pinned_versions

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]  # the repository: pytest reads pyproject.toml's settings there


def test_constraints_pin_the_oracle():
    assert pinned_versions()["peft"] == "0.21.2"


def _collect_with_fake_peft(tmp_path: Path, init_source: str) -> subprocess.CompletedProcess:
    """Collect one small test file with a stand-in `peft` package first on the path."""
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text(init_source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(HERE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("init_source, said", [
    ("__version__ = '0.20.0'\n", "found 0.20.0"),
    ("raise ImportError('hidden for this test')\n", "not importable: hidden for this test"),
], ids=["other-version", "missing"])
def test_run_stops_without_the_pinned_oracle(tmp_path, init_source, said):
    result = _collect_with_fake_peft(tmp_path, init_source)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "HF PEFT 0.21.2 (the test oracle)" in output and said in output, output
    assert "make install" in output and CONSTRAINTS.name in output, output


def test_run_goes_ahead_with_the_pinned_oracle(tmp_path):
    result = _collect_with_fake_peft(tmp_path, "__version__ = '0.21.2'\n")
    assert result.returncode == 0, result.stdout + result.stderr
