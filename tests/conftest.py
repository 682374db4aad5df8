"""Test files live in sub-folders by what they test (core/, methods/, prompt/, quant/, checkpoint/, safety/,
cli/, integrations/); the helper modules beside this file (models.py, cases.py, ...) are imported by name from
any of them: pyproject.toml's `pythonpath = ["tests"]` puts this folder on sys.path whatever the import mode.
Test basenames stay unique across folders (pytest's default import mode, no __init__.py files)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    """No oracle, no run: the suite's comparisons with HF PEFT must not turn into skips."""
    from requirements import problems

    found = problems()
    if found:
        raise pytest.UsageError(
            "the test environment is incomplete: " + "; ".join(found)
            + ". Run `make install` (it installs pyproject.toml's test extras with constraints.txt's pins)."
        )


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def adapter_dir(tmp_path):
    """A fresh, empty directory for saving adapters."""
    d = tmp_path / "adapter"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine two threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
