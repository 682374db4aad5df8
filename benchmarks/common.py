"""Shared helpers of the fastpeft-vs-HF-PEFT benchmarks: interleaved timing, peak memory in a fresh process,
output checks and ratio lines.

Import from a benchmark script (works for `python benchmarks/x.py` and `python -m benchmarks.x`):

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import check_close, interleaved, peak_memory, ratio_line

Peak memory, and why it is measured this way: torch allocates CPU tensor storage with its own allocator
(posix_memalign / malloc underneath), outside Python's allocator, so `tracemalloc` sees none of it, and a
lifetime `ru_maxrss` mostly measures imports and model construction. Here each (library, workload) runs in its
own child process, forked from the benchmark after the imports (so a child starts in well under a second; a
spawned child would import torch + transformers + both libraries again, ~10 s each on the dev VM). The child
fixes glibc's mmap threshold at 128 KiB (`mallopt`), builds its model, makes one warm-up call, hands glibc's
free heap pages back to the kernel (`malloc_trim(0)`), takes its resident size as the baseline, resets the
kernel's peak-RSS counter (VmHWM, through /proc/self/clear_refs "5"), runs the workload, and reports
VmHWM - baseline: the extra memory the call touched (activations, saved tensors, gradients). Without the trim,
buffers freed by the warm-up stay resident in malloc's free lists and the measured call reuses them unseen (a
10 MiB tensor read as 0 MiB). Checked: one 10 MiB tensor plus 2000 x 32 KiB tensors held at once reads 73.2
MiB (72.5 MiB of data). Without /proc/self/clear_refs (not Linux) it falls back to ru_maxrss, and to spawn
where fork is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import os
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation chatter

MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


# ------------------------------------------------------------------------------------------------ timing


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time in ms of each `variants[label]()` over `rounds` rounds.

    Each round calls every variant once, and the order is reversed every other round (A B, B A, ...), so
    machine noise and cache/order effects hit all variants alike. `warmup` untimed rounds come first.
    """
    return interleaved_with_setup({label: (_nothing, _ignore_arg(fn)) for label, fn in variants.items()},
                                  rounds, warmup)


def interleaved_with_setup(variants: dict[str, tuple[Callable[[], object], Callable[[object], object]]],
                           rounds: int, warmup: int = 2, quiet_gc: bool = False) -> dict[str, float]:
    """As `interleaved`, for `variants[label] = (setup, fn)`: `fn(setup())` is called and only `fn` is timed
    (e.g. setup copies the base model that get_peft_model then modifies).

    `quiet_gc`: collect garbage after setup and keep the collector off during `fn`, as `timeit` does. For
    workloads that leave a big heap behind (deep copies of a 48-layer model each round), a full collection
    costs ~240 ms on the dev VM and lands in whichever call happens to cross the collector's threshold:
    without this, one library's median can swing 2.5x between runs of the same code (149 ms vs 388 ms for
    from_pretrained).
    """
    labels = list(variants)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(warmup + rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            setup, fn = variants[label]
            arg = setup()
            elapsed = _timed_call(fn, arg, quiet_gc)
            if i >= warmup:
                times[label].append(elapsed)
    return {label: statistics.median(values) for label, values in times.items()}


def _timed_call(fn: Callable[[object], object], arg: object, quiet_gc: bool) -> float:
    """ms of `fn(arg)`; with `quiet_gc`, garbage is collected first and the collector is off during the
    call."""
    if quiet_gc:
        gc.collect()
        gc.disable()
    try:
        start = time.perf_counter()
        fn(arg)
        return (time.perf_counter() - start) * 1e3
    finally:
        if quiet_gc:
            gc.enable()


def _nothing() -> None:
    return None


def _ignore_arg(fn: Callable[[], object]) -> Callable[[object], object]:
    return lambda _: fn()


def timed_once(fn: Callable[[], object]) -> tuple[object, float]:
    """(result, ms) of one call."""
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1e3


# ------------------------------------------------------------------------------------------------ memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(key + r":\s+(\d+)\s+kB", f.read())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} line")
    return int(match.group(1))


def _libc(fn: str, *args: int) -> None:
    """Call glibc's `fn(*args)`; nothing where the C library is not glibc."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), fn)(*args)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib() -> int:
    try:
        return _status_kib("VmRSS")
    except OSError:  # no /proc: ru_maxrss is the best there is (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib(resettable: bool) -> int:
    if resettable:
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(setup: Callable, args: tuple, workload: Callable, repeats: int, threads: int) -> list[float]:
    """Runs in the child process: peak extra MiB of `workload(state)` for each of `repeats` calls."""
    import gc

    import torch

    _libc("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # tensors > 128 KiB: own mmap, unmapped when freed
    torch.set_num_threads(threads)
    state = setup(*args)
    workload(state)  # warm-up: lazy buffers, persistent gradients, kernel caches
    peaks = []
    for _ in range(repeats):
        gc.collect()
        _libc("malloc_trim", 0)  # free heap pages leave the resident set
        baseline = _rss_kib()
        resettable = _reset_peak()
        workload(state)
        peaks.append((_peak_kib(resettable) - baseline) / 1024)
    return peaks


def peak_memory(jobs: dict[Hashable, tuple[Callable, tuple, Callable]], repeats: int = 3,
                threads: int = 1) -> dict[Hashable, float]:
    """Median peak extra memory (MiB) of each job, each in its own child process, all run concurrently.

    `jobs[label] = (setup, args, workload)`: top-level (picklable) functions; the child calls
    `state = setup(*args)`, then `workload(state)` once to warm up and `repeats` times measured.
    Memory does not depend on the clock, so running the children at the same time is fair and saves time.
    Call it before the benchmark builds or runs any model: a forked child inherits the parent's heap, and
    malloc then serves tensors from its free chunks, whose pages stay resident after free, so the peak grows
    towards the sum of all buffers touched (measured: 354 MiB instead of 141 MiB for the same LoRA step).
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    pools = {label: ProcessPoolExecutor(1, mp_context=ctx) for label in jobs}  # one process per job
    try:
        pending = {label: pools[label].submit(_child, *job[:2], job[2], repeats, threads)
                   for label, job in jobs.items()}
        results = {label: p.result() for label, p in pending.items()}  # a dead child raises, never hangs
    finally:
        for pool in pools.values():
            pool.shutdown()
    return {label: statistics.median(values) for label, values in results.items()}


# ------------------------------------------------------------------------------------------------ checks


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def check_close(actual, expected, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Raise (naming `what`) unless every tensor of `actual` matches `expected`; tensors, tuples, dicts or
    transformers ModelOutputs. Benchmarks call this before timing anything."""
    import torch

    got, want = _tensors(actual), _tensors(expected)
    if len(got) != len(want) or not got:
        raise AssertionError(f"{what}: {len(got)} tensors vs {len(want)} expected")
    for i, (a, b) in enumerate(zip(got, want)):
        try:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        except AssertionError as err:
            raise AssertionError(f"{what}: fastpeft and HF PEFT differ (tensor {i}): {err}") from None
    print(f"  check: {what}: outputs match (atol={atol:g}, rtol={rtol:g})")


# ------------------------------------------------------------------------------------------------ output


def ratio_line(label: str, fastpeft: float, hf: float, unit: str, target: float | None = None) -> str:
    """One result line: both values, fastpeft / HF PEFT (below 1: fastpeft better) and the target verdict."""
    ratio = fastpeft / hf
    verdict = "" if target is None else f"  target <= {target:.2f}: {'met' if ratio <= target else 'NOT met'}"
    return (f"{label:44} fastpeft {fastpeft:9.2f} {unit:3} | HF PEFT {hf:9.2f} {unit:3} | "
            f"fastpeft/HF {ratio:5.2f}{verdict}")


def base_parser(doc: str) -> argparse.ArgumentParser:
    """--quick / --rounds / --threads, shared by the benchmark scripts."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second run: smaller sizes, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: least noise on a shared VM)")
    return parser


def rounds(args: argparse.Namespace) -> int:
    return args.rounds if args.rounds is not None else (3 if args.quick else 9)


def header(args: argparse.Namespace) -> None:
    import peft
    import torch

    mode = "quick" if args.quick else "full"
    print(f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} thread(s), {mode} mode, "
          f"{rounds(args)} interleaved rounds, python {sys.version.split()[0]}")
