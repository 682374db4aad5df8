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

# Under pytest-xdist (`-n 2`, one worker per core) a second intra-op thread per worker only contends.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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


def pytest_terminal_summary(terminalreporter):
    """The `gpu` tests skipped for want of a CUDA device are named in the run's summary, not only counted
    (this hook lives in the top conftest: under pytest-xdist the controller loads no sub-folder conftest)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "gpu" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_line(
            f"gpu marker: {len(skipped)} CUDA test(s) skipped: no CUDA device here (run `pytest -m gpu` on a "
            "GPU machine; tests/integrations/test_gpu.py)")
