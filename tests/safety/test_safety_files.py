"""Crash-safe saves: a process SIGKILLed at any moment of `save_pretrained` leaves each adapter folder
holding the old complete adapter or the new one, never a mix; HF PEFT reads the folder once the next save (or
`atomic.recover`) has finished the killed one.

The kills are real: a child process (torch imported once) forks a saver per trial and the test SIGKILLs it,
either after a random delay while it saves in a loop, or exactly before each file-system step of one save.
Every adapter version v has lora_alpha = v and every LoRA tensor filled with v, so a mix of two versions (or a
torn file) cannot pass the checks.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.checkpoint import atomic

import models

ADAPTERS = {"default": 96, "other": 32}  # adapter name -> r
USER_FILES = {"notes.txt": "my notes, not an adapter file\n", "README.md": "# my own card\n"}


def wide_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 384))


_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    import fastpeft

    ADAPTERS = %r
    %s
    model = fastpeft.get_peft_model(wide_base(),
                                    fastpeft.LoraConfig(r=ADAPTERS["default"], target_modules=["0", "2"]))
    for name, r in ADAPTERS.items():
        if name != "default":
            model.add_adapter(name, fastpeft.LoraConfig(r=r, target_modules=["0", "2"]))

    def save(folder, version):
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.fill_(float(version))
        for config in model.peft_config.values():
            config.lora_alpha = version
        model.save_pretrained(folder)

    def kill_at(step):
        # SIGKILL this process right before its `step`-th file-system step (fsync / rename / rmdir)
        ops = []
        def wrap(name, fn):
            def inner(*args, **kwargs):
                paths = [os.readlink(f"/proc/self/fd/{a}") if isinstance(a, int) else str(a) for a in args]
                ops.append([name, *map(os.path.basename, paths)])
                if len(ops) == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)
            return inner
        for name in ("fsync", "replace", "rmdir"):
            setattr(os, name, wrap(name, getattr(os, name)))
        return ops

    save(os.path.join(sys.argv[1], "warm-up"), 0)  # lazy imports done once, not in every forked saver
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, folder, *args = line.split()
        pid = os.fork()
        if pid == 0:
            if cmd == "loop":
                version = int(args[0])
                while True:
                    save(folder, version)
                    version += 1
            ops = kill_at(int(args[0]))
            save(folder, int(args[1]))
            print("STEPS " + json.dumps(ops), flush=True)
            os._exit(0)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {status}", flush=True)
    """
) % (ADAPTERS, textwrap.indent(inspect.getsource(wide_base), "    ").strip())


class Saver:
    """The child process: `loop(v)` saves v, v+1, ... until killed; `step(k, v)` saves v, killed at step k."""

    def __init__(self, tmp_path: Path):
        script = tmp_path / "saver.py"
        script.write_text(_CHILD)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self._line() == "READY"

    def _line(self) -> str:
        line = self.proc.stdout.readline().strip()
        assert line, f"the saver process died (exit {self.proc.poll()})"
        return line

    def _send(self, *words) -> None:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()

    def loop_killed_after(self, folder: Path, version: int, delay: float) -> None:
        self._send("loop", folder, version)
        pid = int(self._line().split()[1])
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = int(self._line().split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    def step(self, folder: Path, k: int, version: int) -> list | None:
        """Save `version`, killed before file-system step `k`; the list of steps if it finished instead."""
        self._send("step", folder, k, version)
        self._line()  # PID
        line = self._line()
        if line.startswith("STEPS"):
            assert self._line() == "EXIT 0"
            return json.loads(line.split(" ", 1)[1])
        status = int(line.split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        return None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def adapter_folders(folder: Path) -> dict[str, Path]:
    return {name: folder if name == "default" else folder / name for name in ADAPTERS}


def version_seen_by_fastpeft(path: Path) -> int:
    """The version fastpeft reads from an adapter folder; asserts config and every tensor agree on it."""
    config = fastpeft.PeftConfig.from_pretrained(str(path))
    weights = fastpeft.load_peft_weights(str(path))
    version = config.lora_alpha
    assert weights, path
    for key, tensor in weights.items():
        assert torch.equal(tensor, torch.full_like(tensor, float(version))), (
            f"{path}: {key} is not version {version}")
    return version


def version_on_disk(path: Path) -> int:
    """The same check on the plain files, as any other reader (HF PEFT) sees them."""
    version = json.loads((path / "adapter_config.json").read_text())["lora_alpha"]
    for key, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, torch.full_like(tensor, float(version))), f"{path}: {key} torn"
    return version


def assert_user_files_kept(folder: Path) -> None:
    for name, text in USER_FILES.items():
        assert (folder / name).read_text() == text, name


def check_after_kill(folder: Path) -> dict[str, int]:
    """Per adapter folder: fastpeft reads one complete version; after recover() the plain files hold it."""
    seen = {name: version_seen_by_fastpeft(path) for name, path in adapter_folders(folder).items()}
    assert_user_files_kept(folder)
    for name, path in adapter_folders(folder).items():
        atomic.recover(path)
        assert version_on_disk(path) == seen[name]
        assert not [e for e in os.listdir(path) if e.startswith(".fastpeft-")], os.listdir(path)
    return seen


def hf_loads_version(folder: Path, version: int, name: str = "default") -> None:
    path = adapter_folders(folder)[name]
    model = peft.PeftModel.from_pretrained(wide_base(), str(path))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(torch.equal(p, torch.full_like(p, float(version))) for p in lora)


@pytest.fixture(scope="module")
def saver_process(tmp_path_factory):
    proc = Saver(tmp_path_factory.mktemp("saver"))
    yield proc
    proc.close()


@pytest.fixture
def saver(saver_process, tmp_path):
    """The saver process and a folder with the user's own files and version 1 of both adapters."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, text in USER_FILES.items():
        (folder / name).write_text(text)
    assert saver_process.step(folder, 10**6, 1) is not None
    return saver_process, folder


def test_kill9_at_random_moments_leaves_old_or_new_adapter(saver):
    proc, folder = saver
    rng = random.Random(0)
    versions = {name: 1 for name in ADAPTERS}
    changed = 0
    for trial in range(8):
        proc.loop_killed_after(folder, 1000 * (trial + 1), rng.uniform(0.05, 0.6))
        seen = check_after_kill(folder)
        changed += seen != versions
        versions = seen
    assert changed >= 1, "no killed saver ever got a version through: the kills did not exercise saving"
    hf_loads_version(folder, versions["default"])
    hf_loads_version(folder, versions["other"], "other")


def test_kill9_before_every_step_of_a_save_switches_versions_once(saver):
    """Killed before step k of a save: each adapter folder shows the old version up to its commit rename and
    the new one from there on (one switch per folder, in step order), never anything else."""
    proc, folder = saver
    steps = proc.step(folder, 10**6, 2)  # a full save: the file-system steps it takes
    commits = [i for i, op in enumerate(steps)
               if op[0] == "replace" and op[1].startswith(atomic.STAGING_PREFIX)]
    assert len(commits) == len(ADAPTERS), steps  # one commit rename per adapter folder
    fsynced = {op[1] for op in steps[:commits[0]] if op[0] == "fsync"}
    # data on disk before commit
    assert {"adapter_model.safetensors", "adapter_config.json"} <= fsynced, steps
    switched: dict[str, list[int]] = {name: [] for name in ADAPTERS}
    seen = check_after_kill(folder)
    for k in range(1, len(steps) + 1):
        old, new = seen, max(seen.values()) + 1
        assert proc.step(folder, k, new) is None
        seen = check_after_kill(folder)
        for name in ADAPTERS:
            assert seen[name] in (old[name], new), (k, name, old, seen)
            switched[name].append(int(seen[name] == new))
    for (name, flags), commit in zip(switched.items(), commits):
        # killed before step k = commit + 1 (1-based) the rename has not run: old; from k = commit + 2 on: new
        assert flags == [0] * (commit + 1) + [1] * (len(steps) - commit - 1), (name, flags, steps)
    hf_loads_version(folder, seen["default"])


def test_a_killed_save_is_finished_by_the_next_save_and_readers_in_between(saver):
    """A save killed while publishing leaves new and old files side by side: fastpeft reads the new adapter,
    the next save finishes the killed one (user files kept, no hidden folders left), HF PEFT then reads it."""
    proc, folder = saver
    steps = proc.step(folder, 10**6, 5)
    first_publish = next(i for i, op in enumerate(steps)
                         if op[0] == "replace" and op[1] == "adapter_config.json")
    assert steps[first_publish + 1][:2] == ["replace", "adapter_model.safetensors"], steps
    assert proc.step(folder, first_publish + 2, 6) is None  # killed right after the config was published
    assert _config_version(folder) == 6 and _weights_version(folder) == 5  # a mix, as the plain files go
    assert version_seen_by_fastpeft(folder) == 6  # fastpeft reads the committed version
    loaded = fastpeft.PeftModel.from_pretrained(wide_base(), str(folder), strict=True)
    assert all(torch.equal(p, torch.full_like(p, 6.0)) for n, p in loaded.named_parameters() if "lora_" in n)
    loaded.save_pretrained(str(folder))  # finishes the killed save first, then writes its own
    assert sorted(os.listdir(folder)) == sorted(["adapter_config.json", "adapter_model.safetensors", "other",
                                                 *USER_FILES])
    assert_user_files_kept(folder)
    hf_loads_version(folder, 6)


def _config_version(folder: Path) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["lora_alpha"]


def _weights_version(folder: Path) -> int:
    return int(next(iter(load_file(str(folder / "adapter_model.safetensors")).values())).flatten()[0])


def _small_model(version: int):
    model = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(float(version))
    model.peft_config["default"].lora_alpha = version
    return model


def test_saves_into_one_folder_take_turns_and_clear_leftovers(tmp_path):
    """A save waits for the folder's lock (held here as another saving process would), then first removes the
    staging folder a save killed before its commit left behind."""
    folder = tmp_path / "adapter"
    _small_model(1).save_pretrained(str(folder))
    stale = folder / (atomic.STAGING_PREFIX + "dead")
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half a file")
    with atomic._folder_lock(folder):
        saver = threading.Thread(target=_small_model(2).save_pretrained, args=(str(folder),))
        saver.start()
        saver.join(timeout=0.5)
        assert saver.is_alive(), "the save did not wait for the folder's lock"
        assert version_seen_by_fastpeft(folder) == 1
    saver.join(timeout=60)
    assert version_seen_by_fastpeft(folder) == version_on_disk(folder) == 2
    assert not stale.exists()
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_save_without_folder_locks_still_writes_the_adapter(tmp_path, monkeypatch, caplog):
    """Filesystems without flock (some NFS / FUSE mounts) refuse the lock: the save goes on, logged."""
    import errno

    from fastpeft.checkpoint import atomic

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    models.perturb(model)
    with caplog.at_level("WARNING", logger="fastpeft.checkpoint.atomic"):
        model.save_pretrained(tmp_path)
    assert "without the lock" in caplog.text
    loaded = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path)
    torch.testing.assert_close(models.forward(loaded, models.llama_inputs()),
                               models.forward(model.eval(), models.llama_inputs()))
