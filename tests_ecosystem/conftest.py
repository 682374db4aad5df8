"""The ecosystem suite: transformers / diffusers / TRL using fastpeft as `peft`, in an environment WITHOUT HF
PEFT.

Run by `make test-ecosystem` in .venv-eco (the dev venv's packages less HF PEFT). fastpeft.install_as_peft()
runs here, before any test module imports transformers' Trainer, diffusers or TRL (they import peft when they
load).
"""

import importlib.metadata
import importlib.util
import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))  # tests/models.py: the tiny models


def _hf_peft_present() -> str | None:
    spec = importlib.util.find_spec("peft")
    try:
        dist = importlib.metadata.distribution("peft")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if spec is None and dist is None:
        return None
    return f"peft module at {getattr(spec, 'origin', None)}, distribution {getattr(dist, 'version', None)}"


def pytest_configure(config):
    found = _hf_peft_present()
    if found is not None:
        raise pytest.UsageError(
            f"tests_ecosystem must run where HF PEFT is not installed, found {found}. Run "
            "`make test-ecosystem` (it builds .venv-eco without HF PEFT)."
        )
    import fastpeft

    fastpeft.install_as_peft()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
