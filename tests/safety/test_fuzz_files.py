"""Fuzzing adapter files: mutated adapter_config.json contents (several methods) and mutated safetensors
files.

Every input must either load or raise a `FastPeftError` (AdapterConfigError, AdapterLoadError, ...): never a
crash, a hang or another exception type. The example budget is fixed and derandomized so CI is reproducible.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpeft
from fastpeft.errors import FastPeftError

import models

# CI: a fixed, derandomized budget. FASTPEFT_FUZZ_EXAMPLES=5000 runs a longer, randomized search locally.
_DEEP = os.environ.get("FASTPEFT_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_DEEP or 150), deadline=None, derandomize=_DEEP is None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WEIGHTS = "adapter_model.safetensors"

METHODS = {
    "lora": lambda: fastpeft.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                                        rank_pattern={"lin1": 2}),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
    "loha": lambda: fastpeft.LoHaConfig(target_modules=["lin0", "lin1"], r=2),
    "vera": lambda: fastpeft.VeraConfig(target_modules=["lin1"], r=4),
    "boft": lambda: fastpeft.BOFTConfig(target_modules=["lin1"], boft_block_size=4),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved adapter folder per method (fastpeft's own files), read-only templates for the mutations."""
    root = tmp_path_factory.mktemp("templates")
    for name, config in METHODS.items():
        fastpeft.get_peft_model(models.make_mlp(), config()).save_pretrained(str(root / name))
    prompt = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    fastpeft.get_peft_model(models.make_llama(), prompt).save_pretrained(str(root / "prompt"))
    return root


def _copy(template: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(template, dest)
    return dest


def _loads_or_refuses(load, outcomes: list | None = None) -> None:
    """Run `load`: it may succeed or raise a FastPeftError; anything else fails the test. Records which."""
    try:
        load()
    except FastPeftError:
        if outcomes is not None:
            outcomes.append("refused")
        return
    if outcomes is not None:
        outcomes.append("loaded")


# ---------------------------------------------------------------------------------------------------- configs
junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from([0, 1, -1, 2**31, 10**9, 0.5, "LORA", "lin0", "all-linear", ".*", "../x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _mutations(keys: list[str]):
    one = st.tuples(st.sampled_from(["set", "delete", "add"]), st.sampled_from(keys), junk,
                    st.text(max_size=10))
    return st.lists(one, min_size=1, max_size=3)


def _mutate(data: dict, mutations) -> dict:
    data = dict(data)
    for action, key, value, new_key in mutations:
        if action == "delete":
            data.pop(key, None)
        else:
            data[key if action == "set" else new_key or "x"] = value
    return data


def _config_case(saved: Path, tmp_path: Path, method: str, mutations) -> Path:
    folder = _copy(saved / method, tmp_path / "case")
    path = folder / "adapter_config.json"
    data = _mutate(json.loads(path.read_text()), mutations)
    path.write_text(json.dumps(data))  # NaN / Infinity are written as JSON allows them (json.load reads them)
    return folder


def _keys(saved_root_method: str) -> list[str]:
    """Config keys of a method (read from the class, so the strategy is known before the fixture runs)."""
    import dataclasses

    config = METHODS[saved_root_method]() if saved_root_method in METHODS else fastpeft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3)
    return sorted(f.name for f in dataclasses.fields(config))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzzed_configs_load_or_raise_fastpeft_errors(saved, tmp_path, method):
    outcomes: list[str] = []

    @FUZZ
    @given(mutations=_mutations(_keys(method)))
    def run(mutations):
        folder = _config_case(saved, tmp_path, method, mutations)
        _loads_or_refuses(lambda: fastpeft.PeftConfig.from_pretrained(str(folder)))
        _loads_or_refuses(lambda: fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(folder)),
                          outcomes)

    run()
    assert {"loaded", "refused"} <= set(outcomes)  # the mutations reach both sides of the checks


def test_fuzzed_prompt_configs_load_or_raise_fastpeft_errors(saved, tmp_path):
    @settings(FUZZ, max_examples=int(_DEEP or 100))
    @given(mutations=_mutations(_keys("prompt")))
    def run(mutations):
        folder = _config_case(saved, tmp_path, "prompt", mutations)
        _loads_or_refuses(lambda: fastpeft.PeftModel.from_pretrained(models.make_llama(), str(folder)))

    run()


# ------------------------------------------------------------------------------------------------ safetensors
def _split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _length_field(raw: bytes, value: int) -> bytes:
    return struct.pack("<Q", value) + raw[8:]


def _flip(raw: bytes, spots: list[tuple[int, int]]) -> bytes:
    out = bytearray(raw)
    for where, xor in spots:
        out[where % len(out)] ^= xor or 1
    return bytes(out)


def _edit_header(raw: bytes, key_pick: int, field: str, value) -> bytes:
    header, data = _split(raw)
    keys = sorted(header)
    key = keys[key_pick % len(keys)]
    if isinstance(header[key], dict) and key != "__metadata__":
        header[key] = {**header[key], field: value}
    else:
        header[key] = value
    return _join(header, data)


byte_mutation = st.one_of(
    st.builds(lambda v: ("length", v), st.integers(min_value=0, max_value=2**64 - 1)),
    st.builds(lambda s: ("flip", s), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                             min_size=1, max_size=6)),
    st.builds(lambda n: ("truncate", n), st.integers(min_value=0, max_value=10**6)),
    st.builds(lambda k, f, v: ("header", (k, f, v)), st.integers(0, 50),
              st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), junk),
)


def _apply(raw: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "length":
        return _length_field(raw, arg)
    if kind == "flip":
        return _flip(raw, arg)
    if kind == "truncate":
        return raw[: arg % (len(raw) + 1)]
    return _edit_header(raw, *arg)


@FUZZ
@given(mutation=byte_mutation, method=st.sampled_from(["lora", "ia3", "vera"]))
def test_fuzzed_safetensors_files_load_or_raise_fastpeft_errors(saved, tmp_path, mutation, method):
    folder = _copy(saved / method, tmp_path / "case")
    raw = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(_apply(raw, mutation))
    _loads_or_refuses(lambda: fastpeft.load_peft_weights(str(folder)))
    _loads_or_refuses(lambda: fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(folder)))


def test_the_mutations_do_reach_the_checks(saved, tmp_path):
    """Sanity: each mutation kind turns the template into a file that is refused (the fuzz is not a no-op)."""
    raw = (saved / "lora" / WEIGHTS).read_bytes()
    for mutation in (("length", 2**63), ("truncate", 20), ("header", (0, "shape", [10**9])),
                     ("header", (1, "data_offsets", [0, math.factorial(30)]))):
        folder = _copy(saved / "lora", tmp_path / "sanity")
        (folder / WEIGHTS).write_bytes(_apply(raw, mutation))
        with pytest.raises(FastPeftError):
            fastpeft.load_peft_weights(str(folder))
    ok = fastpeft.load_peft_weights(str(saved / "lora"))
    assert all(isinstance(t, torch.Tensor) for t in ok.values())
