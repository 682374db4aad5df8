"""Loading options HF PEFT has: low_cpu_mem_usage, key_mapping, inject_adapter_in_model(state_dict=...) are
implemented; ephemeral_gpu_offload=True is refused. None of them is accepted and ignored."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.core.layer import AdapterLayer
from fastpeft.errors import AdapterLoadError
from oracle_rows import ORACLE_ROWS, row_config, row_outputs, trained_row

from models import MODELS

LAYER_ROWS = [c for c in ORACLE_ROWS if c.method not in ("PromptTuningConfig",)]


def _meta_adapter_weights(model, adapter: str = "default") -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_meta and adapter in n.split(".")]


@pytest.mark.parametrize("case", LAYER_ROWS, ids=lambda c: c.id)
def test_low_cpu_mem_usage_load_equals_hf(case, tmp_path):
    """Every layer method: adapter weights start on the meta device and take the file's tensors."""
    theirs = trained_row(peft, case)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path), low_cpu_mem_usage=True)
    assert not _meta_adapter_weights(ours)
    torch.testing.assert_close(row_outputs(ours.eval(), case), row_outputs(theirs, case),
                               atol=1e-4, rtol=1e-4)


def test_low_cpu_mem_usage_builds_on_meta_then_loads(tmp_path):
    case = next(c for c in ORACLE_ROWS if c.id == "lora-llama")
    trained_row(fastpeft, case).save_pretrained(str(tmp_path))
    model = fastpeft.inject_adapter_in_model(row_config(fastpeft, case), MODELS[case.model][0](),
                                             low_cpu_mem_usage=True)
    assert _meta_adapter_weights(model), (
        "low_cpu_mem_usage=True must create the adapter weights without memory")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    state = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    fastpeft.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert not _meta_adapter_weights(model)
    ours = fastpeft.get_peft_model_state_dict(model)
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_low_cpu_mem_usage_refuses_a_file_that_leaves_weights_empty(tmp_path):
    case = next(c for c in ORACLE_ROWS if c.id == "lora-mlp")
    trained_row(fastpeft, case).save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    partial = {k: v for k, v in saved.items() if "lin0" not in k}
    model = fastpeft.inject_adapter_in_model(row_config(fastpeft, case), MODELS[case.model][0](),
                                             low_cpu_mem_usage=True)
    with pytest.raises(AdapterLoadError, match="no values for 2 weight"):
        fastpeft.set_peft_model_state_dict(model, {k.removeprefix("base_model.model."): v
                                                   for k, v in partial.items()})
    assert len(_meta_adapter_weights(model)) == 4, "a refused load leaves every weight as it was"


class _RenamedMLP(torch.nn.Module):
    """The rows' MLP (same weights) with `lin0` renamed `first`, as a newer layout of a model might."""

    def __init__(self):
        super().__init__()
        source = MODELS["mlp"][0]()
        self.first, self.act, self.lin1, self.head = source.lin0, source.act, source.lin1, source.head

    def forward(self, x):
        return self.head(self.act(self.lin1(self.act(self.first(x)))))


def _renamed_mlp():
    return _RenamedMLP()


def test_key_mapping_renames_file_keys_like_hf(tmp_path):
    case = next(c for c in ORACLE_ROWS if c.id == "lora-mlp")
    trained_row(fastpeft, case).save_pretrained(str(tmp_path))
    mapping = {r"^lin0\.": "first."}
    ours = fastpeft.load_peft_weights(str(tmp_path), key_mapping=mapping)
    theirs = peft.utils.load_peft_weights(str(tmp_path), key_mapping=mapping)
    assert sorted(ours) == sorted(theirs) and any(".first." in k for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_from_pretrained_key_mapping_and_model_default(tmp_path):
    case = next(c for c in ORACLE_ROWS if c.id == "lora-mlp")
    source = trained_row(fastpeft, case)
    source.save_pretrained(str(tmp_path))
    inputs = MODELS["mlp"][1]()
    kwargs = {"target_modules": ["first", "lin1"], "r": 4}
    cfg = fastpeft.LoraConfig(**kwargs)
    with pytest.raises(AdapterLoadError):  # without a mapping the file's lin0 keys fit nothing
        fastpeft.PeftModel.from_pretrained(_renamed_mlp(), str(tmp_path), config=cfg, strict=True)
    model = fastpeft.PeftModel.from_pretrained(_renamed_mlp(), str(tmp_path),
                                               config=fastpeft.LoraConfig(**kwargs),
                                               key_mapping={r"^lin0\.": "first."}, strict=True)
    torch.testing.assert_close(model(inputs), source(inputs), atol=0, rtol=0)
    base = _renamed_mlp()
    base._checkpoint_conversion_mapping = {r"^lin0\.": "first."}  # transformers' per-model renames
    model = fastpeft.PeftModel.from_pretrained(base, str(tmp_path),
                                               config=fastpeft.LoraConfig(**kwargs), strict=True)
    torch.testing.assert_close(model(inputs), source(inputs), atol=0, rtol=0)


def test_inject_targets_the_state_dict_modules(tmp_path):
    case = next(c for c in ORACLE_ROWS if c.id == "lora-mlp")
    trained_row(fastpeft, case).save_pretrained(str(tmp_path))
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    only_lin1 = fastpeft.LoraConfig(r=4, target_modules=["lin1"])
    model = fastpeft.inject_adapter_in_model(only_lin1, MODELS["mlp"][0](), state_dict=state)
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert adapted == {"lin0", "lin1"}
    with pytest.raises(ValueError, match="has not"):
        fastpeft.inject_adapter_in_model(only_lin1, MODELS["mlp"][0](),
                                         state_dict={"nope.lora_A.weight": state[next(iter(state))]})


def test_ephemeral_gpu_offload_is_refused(tmp_path):
    case = next(c for c in ORACLE_ROWS if c.id == "lora-mlp")
    model = trained_row(fastpeft, case)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        fastpeft.PeftModel.from_pretrained(MODELS["mlp"][0](), str(tmp_path), ephemeral_gpu_offload=True)
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        model.load_adapter(str(tmp_path), "other", ephemeral_gpu_offload=True)
    assert list(model.peft_config) == ["default"]


# ---------------------------------------------------------------------------------------------- edges
def _lora_folder(tmp_path, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(MODELS["mlp"][0](), fastpeft.LoraConfig(
        r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, **kwargs))
    model.to(dtype).save_pretrained(str(tmp_path))
    return str(tmp_path)


def _lora_state(model) -> dict:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(("base_dtype", "file_dtype", "trainable"), [
    (torch.bfloat16, torch.float32, False), (torch.float32, torch.bfloat16, True)])
def test_low_cpu_mem_usage_gives_the_normal_loads_dtypes_and_flags(
        tmp_path, base_dtype, file_dtype, trainable):
    """Adapter dtype (fp32 on a bf16 base, as autocast_adapter_dtype) and requires_grad as without the
    option."""
    folder = _lora_folder(tmp_path, file_dtype)
    loaded = [fastpeft.PeftModel.from_pretrained(MODELS["mlp"][0]().to(base_dtype), folder,
                                                 is_trainable=trainable, low_cpu_mem_usage=low)
              for low in (False, True)]
    assert _lora_state(loaded[1]) == _lora_state(loaded[0])
    assert set(_lora_state(loaded[1]).values()) == {(torch.float32, trainable)}


def test_low_cpu_mem_usage_copies_the_callers_tensors(tmp_path):
    """The model's weights do not alias the state dict passed in (a later step must not edit the caller's)."""
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(f"{_lora_folder(tmp_path)}/adapter_model.safetensors").items()}
    kept = {k: v.clone() for k, v in state.items()}
    model = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=4, target_modules=["lin0", "lin1"]),
                                             MODELS["mlp"][0](), low_cpu_mem_usage=True)
    fastpeft.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    assert all(torch.equal(state[k], kept[k]) for k in state)


def test_load_adapter_low_cpu_mem_usage_builds_on_meta(tmp_path, monkeypatch):
    from fastpeft.checkpoint import keys

    folder = _lora_folder(tmp_path)
    model = fastpeft.PeftModel.from_pretrained(MODELS["mlp"][0](), folder)
    seen, write = [], keys.write_tensor
    monkeypatch.setattr(keys, "write_tensor",
                        lambda target, value: (seen.append(target.is_meta), write(target, value)))
    model.load_adapter(folder, "other", low_cpu_mem_usage=True)
    assert seen and all(seen)


def test_low_cpu_mem_usage_refuses_base_rewriting_inits(tmp_path):
    torch.manual_seed(0)
    fastpeft.get_peft_model(MODELS["mlp"][0](), fastpeft.LoraConfig(
        r=4, target_modules=["lin0"], init_lora_weights="pissa")).save_pretrained(str(tmp_path))
    base = MODELS["mlp"][0]()
    before = base.lin0.weight.clone()
    with pytest.raises(ValueError, match="low_cpu_mem_usage=False"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path), low_cpu_mem_usage=True)
    assert torch.equal(base.lin0.weight, before)


def test_key_mapping_rules_follow_hf(tmp_path):
    """The first matching pattern only (as HF); two keys mapped to one name are refused, not merged."""
    folder = _lora_folder(tmp_path)
    mapping = {r"^lin0\.": "first.", r"first": "second"}
    ours = fastpeft.load_peft_weights(folder, key_mapping=mapping)
    assert sorted(ours) == sorted(peft.utils.load_peft_weights(folder, key_mapping=mapping))
    with pytest.raises(AdapterLoadError, match="several file keys"):
        fastpeft.load_peft_weights(folder, key_mapping={r"^lin[01]\.": "first."})


def test_model_key_mapping_does_not_apply_to_prompt_methods(tmp_path):
    """A prompt adapter's file holds `prompt_embeddings` (no module path): the base model's renames leave it
    be."""
    fastpeft.get_peft_model(MODELS["llama"][0](), fastpeft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(str(tmp_path))
    base = MODELS["llama"][0]()
    base._checkpoint_conversion_mapping = {r"^model\.": "model.language_model."}
    fastpeft.PeftModel.from_pretrained(base, str(tmp_path))


def test_state_dict_targets_warn_only_when_they_differ(tmp_path, caplog):
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(f"{_lora_folder(tmp_path)}/adapter_model.safetensors").items()}
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=4, target_modules=["lin0", "lin1"]),
                                         MODELS["mlp"][0](), state_dict=state)
        assert "state_dict targets" not in caplog.text
        fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=4, target_modules=["lin1"]),
                                         MODELS["mlp"][0](), state_dict=state)
    assert caplog.text.count("state_dict targets") == 1


def test_state_dict_functions_refuse_unknown_adapter_name():
    """HF PEFT raises KeyError for a name the model lacks; returning {} would save an empty file, and a load
    would write nothing with every key unexpected."""
    import models

    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    state = fastpeft.get_peft_model_state_dict(model)
    assert state  # the right name gives the adapter's tensors
    with pytest.raises(KeyError, match="defualt"):
        fastpeft.get_peft_model_state_dict(model, adapter_name="defualt")
    with pytest.raises(KeyError, match="defualt"):
        fastpeft.set_peft_model_state_dict(model, state, adapter_name="defualt")
    with pytest.raises(KeyError):
        peft.get_peft_model_state_dict(model, adapter_name="defualt")
