"""Adapter folders from untrusted sources: pickles, forged safetensors headers, absurd or ill-typed configs,
paths and symlinks that leave the folder, remote code. Each is refused with a fastpeft error before anything
is built; HF PEFT is the oracle for what well-formed files (its own and ours) must still do."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file

import fastpeft
from fastpeft.checkpoint import validate
from fastpeft.checkpoint.validate import check_contained
from fastpeft.errors import AdapterConfigError, AdapterLoadError, FastPeftError, UnsafeAdapterFileError

import models
from oracle_helpers import rewrite_config

WEIGHTS = "adapter_model.safetensors"


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=what)


def _lora(**extra):
    return fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(
        target_modules=["lin0", "lin1"], r=4, init_lora_weights=False, **extra)).eval()


def _saved(folder: Path, **extra) -> torch.Tensor:
    model = _lora(**extra)
    model.save_pretrained(str(folder))
    return models.forward(model, models.mlp_inputs())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------- pickles
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_pickle_payload_in_bin_file_is_refused_and_never_runs(tmp_path):
    _saved(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS).unlink()
    marker = tmp_path / "MARKER"
    torch.save({"evil": _Payload(str(marker))}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(UnsafeAdapterFileError, match="weights_only"):
        fastpeft.load_peft_weights(str(tmp_path / "a"))
    base = models.make_mlp()
    before = _weights(base)
    with pytest.raises(UnsafeAdapterFileError, match="adapter_model.bin"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"))
    assert not marker.exists()
    _unchanged(base, before)
    with pytest.raises(pickle.UnpicklingError):  # the oracle refuses it too
        peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "a"))
    assert not marker.exists()


def test_bin_files_of_plain_tensors_load_both_ways(tmp_path):
    expected = _saved(tmp_path / "ours")  # safetensors, then the same adapter as .bin
    fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "ours")).save_pretrained(
        str(tmp_path / "bin"), safe_serialization=False)
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "bin")).eval()
    close(models.forward(theirs, models.mlp_inputs()), expected, "fastpeft .bin -> HF")
    theirs.save_pretrained(str(tmp_path / "hf_bin"), safe_serialization=False)
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "hf_bin")).eval()
    close(models.forward(ours, models.mlp_inputs()), expected, "HF .bin -> fastpeft")


def test_bin_file_that_is_not_a_dict_of_tensors_is_refused(tmp_path):
    _saved(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS).unlink()
    torch.save([torch.zeros(2)], tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="dict of tensors"):
        fastpeft.load_peft_weights(str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(AdapterLoadError, match="could not be read"):
        fastpeft.load_peft_weights(str(tmp_path / "a"))


# ------------------------------------------------------------------------------------------------ safetensors
def _raw(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


FORGED = {
    "header length beyond the file": (_raw({"a": _entry([2], 0, 8)}, bytes(8), length=1 << 40),
                                      "header claims"),
    "header length = whole file": (_raw({"a": _entry([2], 0, 8)}, bytes(8), length=200), "header claims"),
    "tensor bytes beyond the file": (_raw({"a": _entry([4], 0, 16)}, bytes(8)), "declares 16 bytes"),
    "huge shape": (_raw({"a": _entry([1 << 30, 1 << 30], 0, 8)}, bytes(8)), "does not match"),
    "overlapping tensors": (_raw({"a": _entry([2], 0, 8), "b": _entry([2], 4, 12)}, bytes(12)), "overlaps"),
    "negative offsets": (_raw({"a": _entry([2], -8, 0)}, bytes(8)), "malformed"),
    "unknown dtype": (_raw({"a": _entry([2], 0, 8, dtype="Q99")}, bytes(8)), "unknown dtype"),
    "header not JSON": (struct.pack("<Q", 4) + b"{{{{" + bytes(8), "not valid JSON"),
    "header a JSON list": (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "metadata not strings": (_raw({"__metadata__": {"format": 1}}, b""), "__metadata__"),
    "three bytes": (b"abc", "truncated"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_safetensors_headers_are_refused_before_reading(tmp_path, case):
    raw, match = FORGED[case]
    _saved(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS).write_bytes(raw)
    with pytest.raises(AdapterLoadError, match=match) as err:
        fastpeft.load_peft_weights(str(tmp_path / "a"))
    assert WEIGHTS in str(err.value)
    _from_pretrained_refused(tmp_path / "a", FastPeftError)


def test_forged_sizes_are_unsafe_errors(tmp_path):
    path = tmp_path / WEIGHTS
    path.write_bytes(FORGED["tensor bytes beyond the file"][0])
    with pytest.raises(UnsafeAdapterFileError):
        validate.safetensors_header(path)


def test_valid_safetensors_with_odd_but_legal_tensors_load(tmp_path):
    tensors = {"a": torch.zeros(0, 3), "b": torch.ones(()),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(tensors, tmp_path / WEIGHTS)
    loaded = validate.load_safetensors(str(tmp_path / WEIGHTS))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


# ---------------------------------------------------------------------------------------------------- configs
ABSURD = {
    "r": (10**9, "LoraConfig.r"),
    "rank_pattern": ({"lin0": 10**9}, "rank_pattern"),
    "r ": (-3, "outside"),
}


@pytest.mark.parametrize("field", sorted(ABSURD))
def test_absurd_sizes_refused_when_the_config_is_read(tmp_path, field):
    value, match = ABSURD[field]
    _saved(tmp_path / "a")
    rewrite_config(tmp_path / "a", **{field.strip(): value})
    with pytest.raises(AdapterConfigError, match=match):
        fastpeft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    _from_pretrained_refused(tmp_path / "a", AdapterConfigError)


def _from_pretrained_refused(folder, error) -> None:
    """Loading `folder` onto a fresh base raises `error` and leaves the base's weights as they were."""
    base = models.make_mlp()
    before = _weights(base)
    with pytest.raises(error):
        fastpeft.PeftModel.from_pretrained(base, str(folder))
    _unchanged(base, before)


def test_sizes_beyond_the_base_model_refused_before_allocation(tmp_path):
    _saved(tmp_path / "a")
    rewrite_config(tmp_path / "a", r=500_000)  # fine for some model, not for a 20-wide MLP
    fastpeft.PeftConfig.from_pretrained(str(tmp_path / "a"))  # the file alone is plausible
    model = _lora()
    with pytest.raises(AdapterConfigError, match=r"LoraConfig.r=500000 .* outside \[0, 1024\]"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "a"))
    with pytest.raises(AdapterConfigError, match="outside"):
        model.load_adapter(str(tmp_path / "a"), adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_prompt_table_larger_than_the_model_refused(tmp_path):
    config = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    fastpeft.get_peft_model(models.make_llama(), config).save_pretrained(str(tmp_path / "p"))
    rewrite_config(tmp_path / "p", num_virtual_tokens=1000, num_transformer_submodules=1000)
    with pytest.raises(AdapterConfigError, match="prompt table"):
        fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path / "p"))
    rewrite_config(tmp_path / "p", num_virtual_tokens=10**8)
    with pytest.raises(AdapterConfigError, match="num_virtual_tokens"):
        fastpeft.PeftConfig.from_pretrained(str(tmp_path / "p"))


ILL_TYPED = {
    "r": "8", "lora_alpha": "sixteen", "lora_dropout": math.nan, "target_modules": 5, "fan_in_fan_out": "yes",
    "bias": "sometimes", "layers_to_transform": {"a": 1}, "rank_pattern": [1, 2], "use_dora": None,
}


@pytest.mark.parametrize("field", sorted(ILL_TYPED))
def test_ill_typed_config_values_name_the_field(tmp_path, field):
    _saved(tmp_path / "a")
    rewrite_config(tmp_path / "a", **{field: ILL_TYPED[field]})
    with pytest.raises(AdapterConfigError, match=field) as err:
        fastpeft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert "adapter_config.json" in str(err.value)


def test_config_file_that_is_not_json_or_too_large(tmp_path):
    _saved(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ("[" * 100_000, "JSON"),
                        ('{"peft_type": ["LORA"]}', "peft_type")):
        path.write_text(text)
        with pytest.raises(AdapterConfigError, match=match):
            fastpeft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AdapterConfigError):
        fastpeft.PeftConfig.from_pretrained(str(tmp_path / "a"))


def _hf_configs():
    """HF PEFT's default config of every method fastpeft registers (those constructible without arguments)."""
    from fastpeft.registry import registered

    found = {}
    for peft_type in registered():
        cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type.value)
        try:
            found[peft_type.value] = cls(task_type="CAUSAL_LM") if cls else None
        except (TypeError, ValueError):
            continue
    return {k: v for k, v in found.items() if v is not None}


def test_every_hf_default_config_passes_the_checks(tmp_path):
    configs = _hf_configs()
    assert len(configs) >= 20, sorted(configs)
    for name, config in configs.items():
        config.save_pretrained(str(tmp_path / name))
        loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / name))
        assert loaded.peft_type == name


# ---------------------------------------------------------------------------------------------------- paths
def test_subfolder_that_leaves_the_folder_is_refused(tmp_path):
    _saved(tmp_path / "outside")
    (tmp_path / "root").mkdir()
    for bad in ("../outside", "a/../../outside", str(tmp_path / "outside")):
        with pytest.raises(UnsafeAdapterFileError, match="subfolder"):
            fastpeft.PeftConfig.from_pretrained(str(tmp_path / "root"), subfolder=bad)
        with pytest.raises(UnsafeAdapterFileError, match="subfolder"):
            fastpeft.load_peft_weights(str(tmp_path / "root"), subfolder=bad)
        with pytest.raises(UnsafeAdapterFileError):
            fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "root"), subfolder=bad)
    expected = _saved(tmp_path / "root" / "inner")  # a real sub-folder loads
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "root"), subfolder="inner")
    close(models.forward(loaded.eval(), models.mlp_inputs()), expected)


def test_adapter_names_that_are_paths_are_refused(tmp_path):
    model = _lora()
    expected = _saved(tmp_path / "a")
    for bad in ("../x", "a/b", "..", "/abs"):
        with pytest.raises(ValueError, match="adapter name"):
            model.load_adapter(str(tmp_path / "a"), adapter_name=bad)
        with pytest.raises(ValueError, match="adapter name"):
            fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "a"), adapter_name=bad)
        with pytest.raises(ValueError, match="do not exist"):
            model.save_pretrained(str(tmp_path / "both"), selected_adapters=[bad])
    assert not (tmp_path / "x").exists() and not (tmp_path / "both").exists()
    model.load_adapter(str(tmp_path / "a"), adapter_name="other")
    model.save_pretrained(str(tmp_path / "both"), selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "both")) == ["other"]
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "both" / "other")).eval()
    close(models.forward(loaded, models.mlp_inputs()), expected)


@pytest.mark.parametrize("name", [WEIGHTS, "adapter_config.json"])
def test_symlink_to_a_file_outside_the_folder_is_refused(tmp_path, name):
    _saved(tmp_path / "real")
    (tmp_path / "a").mkdir()
    for other in {WEIGHTS, "adapter_config.json"} - {name}:
        (tmp_path / "a" / other).write_bytes((tmp_path / "real" / other).read_bytes())
    (tmp_path / "a" / name).symlink_to(tmp_path / "real" / name)
    base = models.make_mlp()
    before = _weights(base)
    with pytest.raises(UnsafeAdapterFileError, match="outside the adapter folder"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"))
    _unchanged(base, before)


def test_symlinks_inside_the_folder_and_hub_cache_snapshots_load(tmp_path):
    expected = _saved(tmp_path / "real")
    snap = tmp_path / "models--me--tiny" / "snapshots" / "abc123"
    blobs = tmp_path / "models--me--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate((WEIGHTS, "adapter_config.json")):
        (blobs / f"blob{i}").write_bytes((tmp_path / "real" / name).read_bytes())
        (snap / name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(snap)).eval()
    close(models.forward(loaded, models.mlp_inputs()), expected, "hub-cache snapshot")
    (tmp_path / "real" / "copy.safetensors").write_bytes((tmp_path / "real" / WEIGHTS).read_bytes())
    (tmp_path / "real" / WEIGHTS).unlink()
    (tmp_path / "real" / WEIGHTS).symlink_to("copy.safetensors")
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "real")).eval()
    close(models.forward(loaded, models.mlp_inputs()), expected, "symlink inside the folder")
    assert check_contained(tmp_path / "real", tmp_path / "real" / WEIGHTS)


def test_save_never_writes_through_a_symlink_out_of_the_folder(tmp_path):
    model = _lora()
    model.load_adapter(str(_saved_dir(tmp_path)), adapter_name="other")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafeAdapterFileError, match="outside save_directory"):
        model.save_pretrained(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "elsewhere") == []
    # a symlinked *file* is replaced by the new file; its outside target keeps its bytes
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / WEIGHTS).symlink_to(victim)
    model.save_pretrained(str(tmp_path / "out2"), selected_adapters=["default"])
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "out2" / WEIGHTS).is_symlink()
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "out2")).eval()
    close(models.forward(theirs, models.mlp_inputs()), models.forward(model, models.mlp_inputs()), "-> HF")


def _saved_dir(tmp_path: Path) -> Path:
    _saved(tmp_path / "src")
    return tmp_path / "src"


# ------------------------------------------------------------------------------------------------ remote code
def test_auto_mapping_import_outside_the_allowlist_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_pkg_fp.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nimport torch\n"
        "class Base(torch.nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _saved(tmp_path / "a")
    rewrite_config(tmp_path / "a", base_model_name_or_path="anything",
                   auto_mapping={"base_model_class": "Base", "parent_library": "evil_pkg_fp"})
    with pytest.raises(UnsafeAdapterFileError, match="import_allowlist"):
        fastpeft.AutoPeftModel.from_pretrained(str(tmp_path / "a"))
    assert not marker.exists()
    with pytest.raises(ValueError, match="allowlist"):  # the oracle refuses it as well
        peft.AutoPeftModel.from_pretrained(str(tmp_path / "a"))
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017  allowed: imported (then Base has no from_pretrained)
        fastpeft.AutoPeftModel.from_pretrained(str(tmp_path / "a"), import_allowlist=["evil_pkg_fp"])
    assert marker.exists()


def test_adapter_tokenizer_remote_code_is_not_trusted_implicitly(tmp_path):
    base = models.make_llama()
    base.save_pretrained(str(tmp_path / "base"))
    config = fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=2)
    model = fastpeft.get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(str(tmp_path / "a"))
    marker = tmp_path / "TOKENIZER_CODE_RAN"
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer",
         "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    (tmp_path / "a" / "evil_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    assert not marker.exists()


def test_cli_refuses_auto_mapping_imports_outside_the_allowlist(tmp_path, monkeypatch):
    from fastpeft.cli.common import CliError, auto_class_for

    marker = tmp_path / "CLI_IMPORTED"
    (tmp_path / "evil_cli_fp.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CliError, match="allowlist"):
        auto_class_for(None, {"parent_library": "evil_cli_fp", "base_model_class": "Base"})
    assert not marker.exists()
    mapping = {"parent_library": "transformers.models.llama.modeling_llama",
               "base_model_class": "LlamaForCausalLM"}
    assert auto_class_for(None, mapping).__name__ == "LlamaForCausalLM"


def test_huge_lists_and_token_ids_refused(tmp_path):
    _saved(tmp_path / "a")
    rewrite_config(tmp_path / "a", target_modules=[f"m{i}" for i in range(70_000)])
    with pytest.raises(AdapterConfigError, match="70000 entries"):
        fastpeft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    config = fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=2,
                                 trainable_token_indices=[1, 2])
    fastpeft.get_peft_model(models.make_llama(), config).save_pretrained(str(tmp_path / "t"))
    fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path / "t"))  # the real file loads
    rewrite_config(tmp_path / "t", trainable_token_indices=[1, 10**7])
    with pytest.raises(AdapterConfigError, match="token ids"):
        fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path / "t"))


def test_base_model_remote_code_named_by_the_adapter_is_not_run(tmp_path):
    """The adapter config names the base folder; that folder's auto_map code runs only with
    trust_remote_code."""
    base = models.make_llama()
    base.save_pretrained(str(tmp_path / "base"))
    marker = tmp_path / "MODEL_CODE_RAN"
    config_path = tmp_path / "base" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "auto_map": {"AutoModelForCausalLM": "evil_model.EvilModel"}}))
    (tmp_path / "base" / "evil_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
        "from transformers import LlamaForCausalLM\nclass EvilModel(LlamaForCausalLM):\n    pass\n")
    lora = fastpeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=2, init_lora_weights=False)
    model = fastpeft.get_peft_model(models.make_llama(), lora).eval()
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(str(tmp_path / "a"))
    loaded = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert not marker.exists()
    assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    x = models.llama_inputs()
    close(models.forward(loaded, x), models.forward(model, x), "AutoPeftModel")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()  # the oracle agrees
    close(models.forward(theirs, x), models.forward(model, x), "HF AutoPeftModel")
    assert not marker.exists()
