"""The `gpu` tests skipped for want of a CUDA device are named in the run's summary, not only counted."""


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "gpu" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_line(
            f"gpu marker: {len(skipped)} CUDA test(s) skipped: no CUDA device here (run `pytest -m gpu` on a "
            "GPU machine; tests/integrations/test_gpu.py)")
