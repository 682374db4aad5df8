"""Crash-safe writes outside `save_pretrained` : the CLI's merged-model export, its
per-epoch checkpoints and its small output files. Whole folders go through `atomic.replace_folder` (built in a
hidden sibling, fsynced, swapped in with one rename); single files through the adapter saver's commit.

The folder swap is tested with real SIGKILLs at every file-system step (a forked child per step),
`fastpeft merge` with real SIGKILLs at moments spread over an export, the other CLI writes with simulated
failures in the middle of a write, and the merged export's outputs against HF PEFT's `merge_and_unload`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch

import fastpeft
from cli_models import save_llama
from fastpeft.checkpoint import atomic
from fastpeft.cli import checkpoints, common, main

import models

FILES = ("a.bin", "b.json", "c.txt")


def fill_with(version: int):
    """A folder writer: three files and a sub-folder, every byte naming `version` (a torn mix cannot pass)."""
    def fill(folder: Path) -> None:
        for name in FILES:
            (folder / name).write_text(f"{version}\n" * 2000)
        (folder / "sub").mkdir()
        (folder / "sub" / "x.txt").write_text(f"{version}\n")
    return fill


def version_of(folder: Path) -> int:
    """The one version every file in `folder` holds; fails on a missing, extra or mixed file."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == sorted([*FILES, "sub/x.txt"]), names
    version = int((folder / "sub" / "x.txt").read_text())
    assert all((folder / n).read_text() == f"{version}\n" * 2000 for n in FILES)  # complete, not torn
    return version


def entries(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


# --------------------------------------------------------------------------------------------- replace_folder
def test_replace_folder_swaps_whole_folders_with_a_plain_folder_mode(tmp_path):
    target = tmp_path / "out"
    atomic.replace_folder(target, fill_with(1))
    assert version_of(target) == 1
    (target / "stale.txt").write_text("from the old export")
    atomic.replace_folder(target, fill_with(2))
    assert version_of(target) == 2 and entries(tmp_path) == ["out"]  # old files gone, nothing left beside it
    (tmp_path / "plain").mkdir()
    assert (target.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777)


def test_failure_inside_fill_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    atomic.replace_folder(target, fill_with(1))

    def half_then_fail(folder: Path) -> None:
        (folder / FILES[0]).write_text("2\n")
        raise OSError("No space left on device (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic.replace_folder(target, half_then_fail)
    assert version_of(target) == 1 and entries(tmp_path) == ["out"]


_CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, shutil, signal, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("atomic_under_test", sys.argv[1])
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)  # atomic.py alone: no torch import, so each forked trial is quick
    FILES = %r
    %s

    def kill_at(step):
        # SIGKILL this process right before its `step`-th file-system step
        ops = []
        def wrap(owner, name):
            fn = getattr(owner, name)
            def inner(*args, **kwargs):
                ops.append(name)
                if len(ops) == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)
            setattr(owner, name, inner)
        for name in ("fsync", "replace", "rename"):
            wrap(os, name)
        wrap(atomic, "_exchange")
        wrap(shutil, "rmtree")
        return ops

    print("READY", flush=True)
    for line in sys.stdin:
        target, step, version, fallback = line.split()
        pid = os.fork()
        if pid == 0:
            if fallback == "1":
                atomic._exchange = lambda a, b: False  # the two-rename path of systems without renameat2
            ops = kill_at(int(step))
            atomic.replace_folder(Path(target), fill_with(int(version)))
            print("DONE " + json.dumps(ops), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {status}", flush=True)
    """
)


@pytest.fixture
def killer(tmp_path):
    import inspect

    script = tmp_path / "killer.py"
    script.write_text(_CHILD % (FILES, textwrap.indent(inspect.getsource(fill_with), "    ").strip()))
    proc = subprocess.Popen([sys.executable, str(script), atomic.__file__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"

    def trial(target: Path, step: int, version: int, fallback: bool) -> bool:
        """Replace `target` with `version`, killed before step `step`; True if the replace finished
        instead."""
        proc.stdin.write(f"{target} {step} {version} {int(fallback)}\n")
        proc.stdin.flush()
        line = proc.stdout.readline().strip()
        if line.startswith("DONE"):
            assert proc.stdout.readline().strip() == "EXIT 0"
            return True
        status = int(line.split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, line
        return False

    yield trial
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_kill9_before_every_step_leaves_the_old_or_the_new_folder(tmp_path, killer, fallback):
    target = tmp_path / "out"
    atomic.replace_folder(target, fill_with(0))
    current, seen = 0, set()
    for step in range(1, 100):
        new = current + 1
        if killer(target, step, new, fallback):
            assert version_of(target) == new
            break
        if not target.exists():  # only between the two renames of the fallback path
            assert fallback
            atomic._drop_leftovers(target)  # what the next export does first: the old folder is put back
        found = version_of(target)
        assert found in (current, new)
        seen.add("new" if found == new else "old")
        atomic.replace_folder(target, fill_with(new + 1))  # the next export clears every leftover
        assert entries(tmp_path) == ["killer.py", "out"]
        current = new + 1
    else:
        pytest.fail("replace_folder never finished")
    assert seen == {"old", "new"}  # the kills straddled the switch


# ------------------------------------------------------------------------------------------- CLI merge export
@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = save_llama(root / "llama")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                 lora_alpha=8, init_lora_weights=False)
    fastpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(
        root / "adapter")
    return base, root / "adapter"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_merge_export_matches_hf_and_a_failed_export_keeps_the_old_one(
        tmp_path, llama_and_adapter, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

    base, adapter = llama_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(adapter), str(out)]) == 0
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    hf_merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    expected = hf_merged.merge_and_unload().eval()(input_ids=ids).logits
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    before = _files(out)

    def disk_full(self, *args, **kwargs):  # the model is already written into the hidden folder by now
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="simulated"):
        main(["merge", str(base), str(adapter), str(out), "--overwrite"])
    assert _files(out) == before and entries(tmp_path) == ["merged"]


_MERGER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from fastpeft.cli import main
    base, adapter, warm = sys.argv[1:4]
    protocol, sys.stdout = sys.stdout, sys.stderr  # the CLI's own messages stay off the protocol pipe
    assert main(["merge", base, adapter, warm]) == 0  # lazy imports done once, not in every forked export
    print("READY", file=protocol, flush=True)
    for line in sys.stdin:
        adapter, out = line.split()
        pid = os.fork()
        if pid == 0:
            os._exit(main(["merge", base, adapter, out, "--overwrite"]))
        print(f"PID {pid}", file=protocol, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {status}", file=protocol, flush=True)
    """
)


def test_kill9_of_fastpeft_merge_leaves_the_old_or_the_new_export(tmp_path, llama_and_adapter):
    """`fastpeft merge` SIGKILLed after random delays while it alternates two adapters into one OUT: OUT
    always holds one complete export, byte for byte (compared with exports of each adapter made without
    kills)."""
    from transformers import AutoModelForCausalLM

    base, adapter_a = llama_and_adapter
    adapter_b = tmp_path / "adapter-b"
    torch.manual_seed(4)
    config = fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                 lora_alpha=8, init_lora_weights=False)
    fastpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(adapter_b)
    refs = {}
    for name, adapter in (("a", adapter_a), ("b", adapter_b)):
        assert main(["merge", str(base), str(adapter), str(tmp_path / f"ref-{name}")]) == 0
        refs[name] = _files(tmp_path / f"ref-{name}")
    assert refs["a"] != refs["b"]
    script = tmp_path / "merger.py"
    script.write_text(_MERGER)
    proc = subprocess.Popen([sys.executable, str(script), str(base), str(adapter_a), str(tmp_path / "warm")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=(tmp_path / "log").open("w"), text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path)))
    ready = proc.stdout.readline().split()
    assert ready and ready[0] == "READY", (tmp_path / "log").read_text()[-2000:]
    out, killed = tmp_path / "out", 0

    def export(adapter: Path, kill_after: float | None) -> float:
        """One forked `fastpeft merge` into OUT, SIGKILLed after `kill_after` s; returns its wall time."""
        nonlocal killed
        start = time.perf_counter()
        proc.stdin.write(f"{adapter} {out}\n")
        proc.stdin.flush()
        pid = int(proc.stdout.readline().split()[1])
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished (and was reaped) first
                pass
        status = int(proc.stdout.readline().split()[1])
        killed += os.WIFSIGNALED(status)
        return time.perf_counter() - start

    try:
        duration = export(adapter_a, None)  # OUT holds export a; its wall time sets the kill moments
        assert _files(out) == refs["a"]
        for trial, fraction in enumerate((0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.45, 0.55, 0.65)):
            export(adapter_b if trial % 2 == 0 else adapter_a, fraction * duration)
            found = _files(out)
            assert found in (refs["a"], refs["b"]), sorted(found)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert killed >= 2  # most kills land inside an export
    # clears killed runs' folders
    assert main(["merge", str(base), str(adapter_b), str(out), "--overwrite"]) == 0
    assert _files(out) == refs["b"] and sorted(p.name for p in tmp_path.glob(".out*")) == []


# -------------------------------------------------------------------------------------------- CLI checkpoints
def _checkpoint_state(epoch: int) -> dict:
    return {"epoch": epoch, "step": 2 * epoch, "seconds": 0.5, "history": {"steps": [], "epochs": []}}


def test_failed_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"], r=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    first = checkpoints.save_checkpoint(tmp_path, model, optimizer, _checkpoint_state(1))
    before = _files(first)
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(10)  # a torn file, then the crash
        raise OSError("killed while writing (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        checkpoints.save_checkpoint(tmp_path, model, optimizer, _checkpoint_state(2))
    monkeypatch.undo()
    assert entries(tmp_path / checkpoints.CHECKPOINTS) == ["epoch-1"] and _files(first) == before
    assert checkpoints.epoch_dirs(tmp_path) == [first]
    assert checkpoints.load_checkpoint(first, model, optimizer)["epoch"] == 1


def test_small_output_files_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    common.write_text(path, json.dumps({"loss": 1.0}))
    real_replace = os.replace

    def fail_commit(src, dst):  # the staged file is complete; the rename that publishes it fails
        if ".fastpeft-" in str(src):
            raise OSError("killed before the rename (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_commit)
    with pytest.raises(OSError, match="simulated"):
        common.write_text(path, json.dumps({"loss": 2.0}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"loss": 1.0} and entries(tmp_path) == ["metrics.json"]
    common.write_text(path, json.dumps({"loss": 3.0}))
    assert json.loads(path.read_text()) == {"loss": 3.0}
