"""Untrusted files read outside `from_pretrained` : `hotswap_adapter`, multitask
prompt tuning's source checkpoint, and the CLI (`inspect`, `merge`'s labels, `train --resume` checkpoints).

Each reads through fastpeft's checked readers: a pickled payload is refused and never runs, a truncated or
forged file is a `FastPeftError` (in the CLI: exit code 2 and a message naming the file), and the model is
unchanged. HF PEFT, where it reads the same file, is the oracle for what still loads and for refusing pickles.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import peft
import peft.utils.hotswap as hf_hotswap
import pytest
import torch
from safetensors.torch import save_file

import fastpeft
from cli_models import lm_texts, save_llama, write_jsonl
from fastpeft.cli import main
from fastpeft.cli.checkpoints import CHECKPOINTS, STATE_FILE
from fastpeft.errors import (
    AdapterConfigError,
    AdapterFileNotFoundError,
    AdapterLoadError,
    UnsafeAdapterFileError,
)
from fastpeft.hotswap import hotswap_adapter
from lora_init_helpers import build_corda, build_loraga

import models

WEIGHTS = "adapter_model.safetensors"


class _Payload:
    """Unpickling this writes a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _forge(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))


def _pickle(path: Path) -> None:
    path.unlink()
    torch.save({"w": _Payload(path.parent / "MARKER")}, path.parent / "adapter_model.bin")


def _bad_json(path: Path) -> None:
    (path.parent / "adapter_config.json").write_text('{"peft_type": "LORA", ')


DAMAGE = {"truncated": (_truncate, AdapterLoadError), "forged": (_forge, UnsafeAdapterFileError),
          "pickled": (_pickle, UnsafeAdapterFileError), "bad json": (_bad_json, AdapterConfigError)}


def _mlp_adapter(folder: Path, seed: int, lib=fastpeft) -> Path:
    torch.manual_seed(seed)
    config = lib.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False)
    lib.get_peft_model(models.make_mlp(), config).save_pretrained(str(folder))
    return folder


def _state(model) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- hotswap
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_hotswap_from_a_damaged_folder_is_refused_and_changes_nothing(tmp_path, damage):
    hurt, error = DAMAGE[damage]
    loaded = _mlp_adapter(tmp_path / "a", seed=0)
    bad = _mlp_adapter(tmp_path / "b", seed=1)
    hurt(bad / WEIGHTS)
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(loaded)).eval()
    before = _state(model)
    with pytest.raises(error):
        hotswap_adapter(model, str(bad), "default")
    assert not (bad / "MARKER").exists()
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_hotswap_pickle_is_refused_by_hf_too_and_clean_files_swap_as_in_hf(tmp_path):
    loaded, good = (_mlp_adapter(tmp_path / "a", seed=0, lib=peft),
                    _mlp_adapter(tmp_path / "g", seed=2, lib=peft))
    bad = _mlp_adapter(tmp_path / "b", seed=1, lib=peft)
    _pickle(bad / WEIGHTS)
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(loaded)).eval()
    with pytest.raises(pickle.UnpicklingError):
        hf_hotswap.hotswap_adapter(theirs, str(bad), "default")
    assert not (bad / "MARKER").exists()
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(loaded)).eval()
    hotswap_adapter(ours, str(good), "default")
    hf_hotswap.hotswap_adapter(theirs, str(good), "default")
    inputs = models.mlp_inputs()
    torch.testing.assert_close(models.forward(ours, inputs), models.forward(theirs, inputs),
                               atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- MPT source file
def _mpt_source(folder: Path) -> Path:
    """A safetensors 'source training' file with the keys multitask prompt tuning reads."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt_embeddings": torch.randn(4, 32), "prefix_task_cols": torch.randn(3, 4, 2),
               "prefix_task_rows": torch.randn(3, 2, 32)}
    save_file(tensors, str(folder / WEIGHTS))
    return folder / WEIGHTS


def _mpt_init(path: Path):
    config = fastpeft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=1, num_ranks=2,
        prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path=str(path))
    return fastpeft.get_peft_model(models.make_llama(), config)


@pytest.mark.parametrize("damage", ["truncated", "forged", "pickled"])
def test_multitask_source_file_goes_through_the_checked_reader(tmp_path, damage):
    hurt, error = DAMAGE[damage]
    path = _mpt_source(tmp_path)
    hurt(path)
    if damage == "pickled":
        path = tmp_path / "adapter_model.bin"
    with pytest.raises(error, match=path.name):
        _mpt_init(path)
    assert not (tmp_path / "MARKER").exists()


def test_multitask_source_file_missing_or_incomplete(tmp_path):
    with pytest.raises(AdapterFileNotFoundError, match="prompt_tuning_init_state_dict_path"):
        _mpt_init(tmp_path / "nope.safetensors")
    save_file({"prompt_embeddings": torch.zeros(4, 32)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(AdapterLoadError, match="lacks"):
        _mpt_init(tmp_path / "partial.safetensors")


# ---------------------------------------------------------------------------------------------- CLI
def _cli_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_cli_inspect_of_a_damaged_adapter_exits_2_naming_the_file(tmp_path, capsys, damage):
    hurt, _ = DAMAGE[damage]
    folder = _mlp_adapter(tmp_path / "a", seed=0)
    hurt(folder / WEIGHTS)
    err = _cli_error(["inspect", folder], capsys)
    assert "Traceback" not in err and ("adapter_model" in err or "adapter_config.json" in err), err
    assert not (folder / "MARKER").exists()


def test_cli_merge_with_damaged_labels_file_exits_2(tmp_path, capsys):
    folder = _mlp_adapter(tmp_path / "a", seed=0)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(task_type="SEQ_CLS", auto_mapping=None)  # as `fastpeft train --task seq-cls` writes it
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "labels.json").write_text('{"labels": [0, 1')
    err = _cli_error(["merge", tmp_path / "no-base", folder, tmp_path / "out"], capsys)
    assert "labels.json" in err and "not readable JSON" in err
    (folder / "labels.json").write_text('{"labels": "pos"}')
    assert "labels.json" in _cli_error(["merge", tmp_path / "no-base", folder, tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return save_llama(root / "llama"), write_jsonl(root / "lm.jsonl", [{"text": t} for t in lm_texts(4)])


@pytest.mark.parametrize("damage", ["truncated", "pickled", "not a checkpoint"])
def test_cli_resume_from_a_damaged_checkpoint_exits_2(tmp_path, capsys, llama_run, damage):
    base, data = llama_run
    out = tmp_path / "run"
    state = out / CHECKPOINTS / "epoch-1" / STATE_FILE
    state.parent.mkdir(parents=True)
    payload = {"trainable": {}, "optimizer": {}, "rng": torch.get_rng_state(), "epoch": 1, "step": 1,
               "seconds": 0.0, "history": {"steps": [], "epochs": []}}
    if damage == "pickled":
        payload["history"] = _Payload(tmp_path / "MARKER")
    if damage == "not a checkpoint":
        payload = [torch.zeros(2)]
    torch.save(payload, state)
    if damage == "truncated":
        _truncate(state)
    err = _cli_error(["train", base, data, "--output-dir", out, "--epochs", "2", "--resume"], capsys)
    assert STATE_FILE in err and "Traceback" not in err, err
    assert not (tmp_path / "MARKER").exists()



# ---------------------------------------------------------------------------------------------- init caches
def _corda(cache: Path, lib: str = "fastpeft", run: bool = True):
    return build_corda(lib, "mlp", "kpm", run=run, cache_file=str(cache))


def _lora_ga(cache: Path, lib: str = "fastpeft", run: bool = True):
    return build_loraga(lib, "mlp", cache_file=str(cache), train=run)


@pytest.mark.parametrize("build", [_corda, _lora_ga], ids=["corda", "lora_ga"])
def test_init_cache_files_are_written_atomically_and_read_checked(tmp_path, build):
    """CorDA's / LoRA-GA's caches keep HF PEFT's torch.save format (HF PEFT reads ours); a damaged or pickled
    cache is a FastPeftError instead of a raw torch error, and pickled code never runs."""
    cache = tmp_path / "c" / "cache.pt"
    build(cache)
    assert sorted(os.listdir(cache.parent)) == ["cache.pt"]  # no staging leftovers beside it
    build(cache, lib="hf", run=False)  # the oracle reads the file we wrote (no calibration run: cache only)
    good = cache.read_bytes()
    cache.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterLoadError, match="cache.pt"):
        build(cache, run=False)
    torch.save({"x": _Payload(tmp_path / "MARKER")}, cache)
    with pytest.raises(UnsafeAdapterFileError, match="weights_only"):
        build(cache, run=False)
    assert not (tmp_path / "MARKER").exists()


# -------------------------------------------------------------------------------------------- LoftQ originals
def test_loftq_original_weights_reader_checks_shards(tmp_path):
    """replace_lora_weights_loftq reads the base model's safetensors shards named by its index file: shard
    names must stay inside the folder and every shard header is checked before safetensors maps the file."""
    from fastpeft.methods.lora.inits.loftq_replace import INDEX_FILE, OriginalWeights

    weight = torch.randn(4, 3)
    save_file({"model.w": weight}, str(tmp_path / "s1.safetensors"))
    _forge(tmp_path / "s2.safetensors")
    index = {"weight_map": {"model.w": "s1.safetensors", "model.v": "s2.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    reader = OriginalWeights(str(tmp_path), None)
    assert torch.equal(reader.get("model.w"), weight)
    with pytest.raises(UnsafeAdapterFileError, match="s2.safetensors"):
        reader.get("model.v")
    index["weight_map"]["model.w"] = "../outside.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UnsafeAdapterFileError, match="outside"):
        OriginalWeights(str(tmp_path), None)
