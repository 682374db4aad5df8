"""All-or-nothing loads and the strict load report.

Every failure path of `PeftModel.from_pretrained` / `load_adapter` (bad JSON, corrupt or truncated
safetensors, shapes of another model, missing / unexpected keys under strict=True, a method's loader failing
half-way, an adapter of another method) must raise an error that names the file, and leave the model exactly
as it was: module tree (types), state_dict values, requires_grad and training flags, peft_config and the
active adapter. Adapters are saved by HF PEFT; HF PEFT also loads them where it succeeds, as the oracle for
the outputs and for the missing / unexpected keys reported by non-strict loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.checkpoint import keys
from fastpeft.checkpoint.keys import LoadResult
from fastpeft.errors import AdapterConfigError, AdapterLoadError, AdapterShapeError
from fastpeft.methods.lora.model import LoraModel
from state_helpers import LORA_KW, WEIGHTS, assert_same_state, hf_saved, state_of

import models


def rewrite_weights(path: Path, change) -> None:
    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def peft_model_with_default(tmp_path: Path):
    """A fastpeft model with adapter 'default' loaded for training, one tensor frozen by hand, in train
    mode."""
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(hf_saved(tmp_path / "good", seed=5)),
                                               is_trainable=True)
    model.base_model.model.lin0.lora_A["default"].weight.requires_grad_(False)
    model.train()
    return model


# ------------------------------------------------------------------------------------------ failure paths
def bad_json(path: Path) -> None:
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')


def corrupt_header(path: Path) -> None:
    data = bytearray((path / WEIGHTS).read_bytes())
    data[8:24] = b"\xff\x00garbage!\x00\xff{[]}"
    (path / WEIGHTS).write_bytes(bytes(data))


def truncated(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def other_shape(path: Path) -> None:
    rewrite_weights(path, lambda t: t.update({"base_model.model.lin1.lora_A.weight": torch.ones(6, 20)}))


def missing_key(path: Path) -> None:
    rewrite_weights(path, lambda t: t.pop("base_model.model.lin0.lora_B.weight"))


def unexpected_key(path: Path) -> None:
    rewrite_weights(path, lambda t: t.update({"base_model.model.act.lora_A.weight": torch.ones(4, 20)}))


# name -> (corrupt the folder, load kwargs, error type, text the message must hold, fails into an existing
# name)
FAILURES = {
    "bad_json": (bad_json, {}, AdapterConfigError, "adapter_config.json", False),
    "corrupt_header": (corrupt_header, {}, AdapterLoadError, WEIGHTS, True),
    "truncated": (truncated, {}, AdapterLoadError, WEIGHTS, True),
    "other_shape": (other_shape, {}, AdapterShapeError, "lin1.lora_A.weight", True),
    "missing_strict": (missing_key, {"strict": True}, AdapterLoadError, "lin0.lora_B", True),
    "unexpected_strict": (unexpected_key, {"strict": True}, AdapterLoadError, "act.lora_A.weight", True),
}


def broken_folder(tmp_path: Path, failure: str) -> Path:
    path = hf_saved(tmp_path / failure)
    FAILURES[failure][0](path)
    return path


def assert_load_error(err, failure: str, path: Path) -> None:
    _, _, kind, text, _ = FAILURES[failure]
    assert isinstance(err.value, kind), repr(err.value)
    message = str(err.value) + " ".join(getattr(err.value, "__notes__", []))
    assert text in message and str(path) in message, message


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_from_pretrained_leaves_base_model_unchanged(tmp_path, failure):
    path = broken_folder(tmp_path, failure)
    base = models.make_mlp()
    base.lin1.weight.requires_grad_(False)
    base.train()
    before = state_of(base)
    with pytest.raises(AdapterLoadError if failure != "bad_json" else AdapterConfigError) as err:
        fastpeft.PeftModel.from_pretrained(base, str(path), **FAILURES[failure][1])
    assert_load_error(err, failure, path)
    assert_same_state(base, before)
    fastpeft.get_peft_model(base, fastpeft.LoraConfig(**LORA_KW))  # the model is still usable


# into a new adapter (every failure), or into the existing one (failures that reach its weights: they are
# kept)
LOAD_ADAPTER_CASES = [(f, "new") for f in sorted(FAILURES)] + [(f, "default") for f in sorted(FAILURES)
                                                                if FAILURES[f][4]]


@pytest.mark.parametrize(("failure", "adapter"), LOAD_ADAPTER_CASES)
def test_failed_load_adapter_leaves_model_unchanged(tmp_path, failure, adapter):
    model = peft_model_with_default(tmp_path)
    path = broken_folder(tmp_path, failure)
    before = state_of(model)
    with pytest.raises(Exception) as err:
        model.load_adapter(str(path), adapter, **FAILURES[failure][1])
    assert_load_error(err, failure, path)
    assert_same_state(model, before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_failed_load_of_base_rewriting_init_puts_base_weights_back(tmp_path, init):
    """PiSSA / OLoRA configs rewrite the base weights when injected (HF PEFT does so on load as well): a load
    that fails afterwards restores them too."""
    path = hf_saved(tmp_path / init, init_lora_weights=init)
    truncated(path)
    base = models.make_mlp()
    before = state_of(base)
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        fastpeft.PeftModel.from_pretrained(base, str(path))
    assert_same_state(base, before)
    model = peft_model_with_default(tmp_path)
    before = state_of(model)
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        model.load_adapter(str(path), "new")
    assert_same_state(model, before)


def test_shape_mismatch_is_a_runtime_error_as_in_hf(tmp_path):
    """HF PEFT raises RuntimeError (torch's size mismatch) for the same folder; ours is one as well."""
    path = broken_folder(tmp_path, "other_shape")
    with pytest.raises(RuntimeError):
        peft.PeftModel.from_pretrained(models.make_mlp(), str(path))
    with pytest.raises(RuntimeError, match=r"\(6, 20\) in the file, \(4, 20\) in the model"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(path))


@pytest.mark.parametrize("where", ["load_extra_file_state", "convert_loaded_state"])
def test_method_loader_failing_half_way_restores_everything(tmp_path, monkeypatch, where):
    """A method hook that writes into the adapter being loaded, then fails: the writes are undone, the error
    wraps the hook's exception and names the file."""
    model = peft_model_with_default(tmp_path)
    path = hf_saved(tmp_path / "other", seed=9)
    original = getattr(LoraModel, where)

    def faulty(self, adapter_name, *args, **kwargs):
        original(self, adapter_name, *args, **kwargs)
        with torch.no_grad():  # scribble over the adapter being loaded (LoRA factors, the head's copy)
            for name, param in self.named_parameters():
                if adapter_name in name.split("."):
                    param.fill_(123.0)
        raise KeyError("the method's loader broke")

    monkeypatch.setattr(LoraModel, where, faulty)
    for name in ("default", "new"):
        before = state_of(model)
        with pytest.raises(AdapterLoadError, match="KeyError.*the method's loader broke") as err:
            model.load_adapter(str(path), name)
        assert str(path / WEIGHTS) in str(err.value)
        assert isinstance(err.value.__cause__, KeyError)
        assert_same_state(model, before)


def test_adapter_of_another_method_is_refused_and_changes_nothing(tmp_path):
    model = peft_model_with_default(tmp_path)
    hf = peft.get_peft_model(models.make_mlp(), peft.IA3Config(target_modules=["lin0", "lin1"],
                                                               feedforward_modules=["lin1"]))
    hf.save_pretrained(str(tmp_path / "ia3"))
    before = state_of(model)
    with pytest.raises(ValueError, match="IA3"):
        model.load_adapter(str(tmp_path / "ia3"), "new")
    assert_same_state(model, before)
    # into the existing LoRA adapter: no key fits; strict refuses, naming each module
    with pytest.raises(AdapterLoadError) as err:
        model.load_adapter(str(tmp_path / "ia3"), "default", strict=True)
    for module in ("base_model.model.lin0", "base_model.model.lin1", "base_model.model.head"):
        assert f"module '{module}'" in str(err.value)
    assert_same_state(model, before)


# ------------------------------------------------------------------------------------------ prompt methods
def _prompt_tuning(lib):
    return lib.PromptTuningConfig(task_type=lib.TaskType.CAUSAL_LM, num_virtual_tokens=4)


def test_prompt_method_failures_leave_model_unchanged(tmp_path):
    hf = peft.get_peft_model(models.make_llama(), _prompt_tuning(peft))
    models.perturb(hf, 3, 0.3)
    hf.save_pretrained(str(tmp_path / "pt"))
    corrupt_header(tmp_path / "pt")
    base = models.make_llama()
    before = state_of(base)
    with pytest.raises(AdapterLoadError, match=WEIGHTS):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path / "pt"))
    assert_same_state(base, before)

    hf.save_pretrained(str(tmp_path / "pt2"))
    rewrite_weights(tmp_path / "pt2", lambda t: t.update({"stray": torch.ones(2)}))
    model = fastpeft.get_peft_model(models.make_llama(), _prompt_tuning(fastpeft))
    before = state_of(model)
    # the prompt embeddings are written by the method's loader before strict sees the stray key: undone
    with pytest.raises(AdapterLoadError, match="stray"):
        model.load_adapter(str(tmp_path / "pt2"), "default", strict=True)
    assert_same_state(model, before)
    with pytest.raises(AdapterLoadError, match="stray"):
        model.load_adapter(str(tmp_path / "pt2"), "second", strict=True)
    assert_same_state(model, before)
    result = model.load_adapter(str(tmp_path / "pt2"), "default")  # non-strict: loads, reports the stray key
    assert result.unexpected_keys == ["stray"]
    ids = models.llama_inputs()
    torch.testing.assert_close(models.forward(model.eval(), ids), models.forward(hf.eval(), ids))


# ------------------------------------------------------------------------------------------ strict report
def test_strict_report_groups_problems_per_module(tmp_path):
    path = hf_saved(tmp_path / "a")
    rewrite_weights(path, lambda t: (t.pop("base_model.model.lin0.lora_B.weight"),
                                     t.update({"base_model.model.act.lora_A.weight": torch.ones(4, 20),
                                               "base_model.model.lin1.lora_A.weight": torch.ones(6, 20)})))
    model = peft_model_with_default(tmp_path)
    before = state_of(model)
    with pytest.raises(AdapterLoadError) as err:
        model.load_adapter(str(path), "new", strict=True, ignore_mismatched_sizes=True)
    report = err.value.report
    assert isinstance(report, LoadResult) and not report.clean
    assert sorted(report.modules) == ["base_model.model.act", "base_model.model.lin0",
                                      "base_model.model.lin1"]
    assert report.modules["base_model.model.lin0"].missing_keys == ["base_model.model.lin0.lora_B.new.weight"]
    assert report.modules["base_model.model.act"].unexpected_keys == ["base_model.model.act.lora_A.weight"]
    assert report.modules["base_model.model.lin1"].mismatched_keys == [
        ("base_model.model.lin1.lora_A.weight", (6, 20), (4, 20))]
    # iterates like torch's _IncompatibleKeys
    missing, unexpected = report
    assert (missing, unexpected) == (report.missing_keys, report.unexpected_keys)
    message = str(err.value)
    for line in ("module 'base_model.model.lin0':", "module 'base_model.model.act':", "strict=False",
                 "shape mismatch: base_model.model.lin1.lora_A.weight is (6, 20) in the file, (4, 20)"):
        assert line in message, message
    assert_same_state(model, before)


def test_non_strict_load_reports_the_keys_hf_reports_and_warns(tmp_path, caplog):
    path = hf_saved(tmp_path / "a")
    rewrite_weights(path, lambda t: (t.pop("base_model.model.lin0.lora_B.weight"),
                                     t.update({"base_model.model.act.lora_A.weight": torch.ones(4, 20)})))
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(hf_saved(tmp_path / "b", seed=5)))
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "b"))
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        result = ours.load_adapter(str(path), "new")
    hf_result = theirs.load_adapter(str(path), "new")
    assert sorted(result.missing_keys) == sorted(hf_result.missing_keys)
    assert sorted(result.unexpected_keys) == sorted(hf_result.unexpected_keys)
    assert "act.lora_A.weight" in caplog.text and "lin0.lora_B.new.weight" in caplog.text
    assert sorted(result.modules) == ["base_model.model.act", "base_model.model.lin0"]
    for name in ("new", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        x = models.mlp_inputs()
        torch.testing.assert_close(models.forward(ours.eval(), x), models.forward(theirs.eval(), x))


def test_files_whose_dtype_differs_load_converted_as_in_hf(tmp_path):
    path = hf_saved(tmp_path / "a")
    rewrite_weights(path, lambda t: t.update({k: v.double() if "lin0" in k else v.half()
                                              for k, v in t.items()}))
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(path))
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(path), strict=True)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    x = models.mlp_inputs()
    torch.testing.assert_close(models.forward(ours, x), models.forward(theirs, x), atol=0, rtol=0)


CLEAN_ROWS = {
    "lora": ("LoraConfig", {**LORA_KW, "lora_dropout": 0.1, "use_rslora": True}),
    "dora": ("LoraConfig", {**LORA_KW, "use_dora": True}),
    "ia3": ("IA3Config", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}),
    "vera": ("VeraConfig", {"r": 4, "target_modules": ["lin1"], "save_projection": True}),
    "vblora": ("VBLoRAConfig", {"r": 4, "target_modules": ["lin0", "lin1"], "num_vectors": 8,
                                "vector_length": 10, "save_only_topk_weights": True}),
    "loha": ("LoHaConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
}


@pytest.mark.parametrize("row", sorted(CLEAN_ROWS))
def test_strict_load_of_hf_adapters_is_clean_both_ways(tmp_path, row):
    """HF-saved adapters load under strict=True with HF's outputs; fastpeft's saves load in HF the same."""
    method, kw = CLEAN_ROWS[row]
    theirs = peft.get_peft_model(models.make_mlp(), getattr(peft, method)(**kw))
    models.perturb(theirs, 2, 0.3)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "hf"), strict=True)
    result = ours.load_adapter(str(tmp_path / "hf"), "again", strict=True)
    assert result.clean and result.modules == {}
    x = models.mlp_inputs()
    torch.testing.assert_close(models.forward(ours, x), models.forward(theirs.eval(), x))
    ours.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "ours"))
    torch.testing.assert_close(models.forward(back, x), models.forward(theirs, x))
    assert json.loads((tmp_path / "ours" / "again" / "adapter_config.json").read_text())["peft_type"] == \
        json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["peft_type"]


def test_set_peft_model_state_dict_strict_on_a_bare_injected_model(tmp_path):
    """The diffusers path (inject_adapter_in_model, no PeftModel): strict=True refuses a file with a key
    missing and leaves every value as it was; the HF-saved file itself loads cleanly and gives HF's
    outputs."""
    path = hf_saved(tmp_path / "a", modules_to_save=None)
    file_state = load_file(str(path / WEIGHTS))
    kw = {**LORA_KW, "modules_to_save": None}
    state = {k.removeprefix("base_model.model."): v for k, v in file_state.items()}
    hf_model = peft.inject_adapter_in_model(peft.LoraConfig(**kw), models.make_mlp())
    assert not peft.set_peft_model_state_dict(hf_model, state).unexpected_keys
    ours = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**kw), models.make_mlp())
    before = state_of(ours)
    partial = {k: v for k, v in state.items() if "lin0.lora_B" not in k}
    with pytest.raises(AdapterLoadError,
                       match=r"module 'lin0':\n  missing \(left at init\): lin0.lora_B.default"):
        fastpeft.set_peft_model_state_dict(ours, {k: v + 1 for k, v in partial.items()}, strict=True)
    assert_same_state(ours, before)
    result = fastpeft.set_peft_model_state_dict(ours, state, strict=True)
    assert result.clean and list(result) == [[], []]
    x = models.mlp_inputs()
    torch.testing.assert_close(models.forward(ours, x), models.forward(hf_model, x))


@pytest.mark.parametrize("error", [MemoryError, torch.OutOfMemoryError, KeyError])
def test_load_failure_keeps_oom_type_and_restores_the_model(tmp_path, monkeypatch, error):
    """An out-of-memory error during a load keeps its type (callers catch it to retry on a smaller device)
    while the model is still restored; other foreign errors become AdapterLoadError."""
    trained = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    models.perturb(trained)
    trained.save_pretrained(tmp_path)
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing(*args, **kwargs):
        raise error("simulated")

    monkeypatch.setattr(keys, "_model_tensors", failing)
    expected = AdapterLoadError if error is KeyError else error
    with pytest.raises(expected):
        model.load_adapter(tmp_path, adapter_name="other")
    assert "other" not in model.peft_config
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
