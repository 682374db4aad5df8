"""Loading options HF PEFT has: low_cpu_mem_usage, key_mapping, inject_adapter_in_model(state_dict=...) are
implemented; ephemeral_gpu_offload=True is refused. None of them is accepted and ignored."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.core.layer import AdapterLayer
from fastpeft.errors import AdapterLoadError
from test_oracle_matrix import ROWS, config, outputs, trained

from models import MODELS

LAYER_ROWS = [c for c in ROWS if c.method not in ("PromptTuningConfig",)]


def _meta_adapter_weights(model, adapter: str = "default") -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_meta and adapter in n.split(".")]


@pytest.mark.parametrize("case", LAYER_ROWS, ids=lambda c: c.id)
def test_low_cpu_mem_usage_load_equals_hf(case, tmp_path):
    """Every layer method: adapter weights start on the meta device and take the file's tensors."""
    theirs = trained(peft, case)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path), low_cpu_mem_usage=True)
    assert not _meta_adapter_weights(ours)
    torch.testing.assert_close(outputs(ours.eval(), case), outputs(theirs, case), atol=1e-4, rtol=1e-4)


def test_low_cpu_mem_usage_builds_on_meta_then_loads(tmp_path):
    case = next(c for c in ROWS if c.id == "lora-llama")
    trained(fastpeft, case).save_pretrained(str(tmp_path))
    model = fastpeft.inject_adapter_in_model(config(fastpeft, case), MODELS[case.model][0](), low_cpu_mem_usage=True)
    assert _meta_adapter_weights(model), "low_cpu_mem_usage=True must create the adapter weights without memory"
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    state = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    fastpeft.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert not _meta_adapter_weights(model)
    ours = fastpeft.get_peft_model_state_dict(model)
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_low_cpu_mem_usage_refuses_a_file_that_leaves_weights_empty(tmp_path):
    case = next(c for c in ROWS if c.id == "lora-mlp")
    trained(fastpeft, case).save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    partial = {k: v for k, v in saved.items() if "lin0" not in k}
    model = fastpeft.inject_adapter_in_model(config(fastpeft, case), MODELS[case.model][0](), low_cpu_mem_usage=True)
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
    case = next(c for c in ROWS if c.id == "lora-mlp")
    trained(fastpeft, case).save_pretrained(str(tmp_path))
    mapping = {r"^lin0\.": "first."}
    ours = fastpeft.load_peft_weights(str(tmp_path), key_mapping=mapping)
    theirs = peft.utils.load_peft_weights(str(tmp_path), key_mapping=mapping)
    assert sorted(ours) == sorted(theirs) and any(".first." in k for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_from_pretrained_key_mapping_and_model_default(tmp_path):
    case = next(c for c in ROWS if c.id == "lora-mlp")
    source = trained(fastpeft, case)
    source.save_pretrained(str(tmp_path))
    inputs = MODELS["mlp"][1]()
    kwargs = {"target_modules": ["first", "lin1"], "r": 4}
    cfg = fastpeft.LoraConfig(**kwargs)
    with pytest.raises(AdapterLoadError):  # without a mapping the file's lin0 keys fit nothing
        fastpeft.PeftModel.from_pretrained(_renamed_mlp(), str(tmp_path), config=cfg, strict=True)
    model = fastpeft.PeftModel.from_pretrained(_renamed_mlp(), str(tmp_path), config=fastpeft.LoraConfig(**kwargs),
                                               key_mapping={r"^lin0\.": "first."}, strict=True)
    torch.testing.assert_close(model(inputs), source(inputs), atol=0, rtol=0)
    base = _renamed_mlp()
    base._checkpoint_conversion_mapping = {r"^lin0\.": "first."}  # transformers' per-model renames
    model = fastpeft.PeftModel.from_pretrained(base, str(tmp_path), config=fastpeft.LoraConfig(**kwargs), strict=True)
    torch.testing.assert_close(model(inputs), source(inputs), atol=0, rtol=0)


def test_inject_targets_the_state_dict_modules(tmp_path):
    case = next(c for c in ROWS if c.id == "lora-mlp")
    trained(fastpeft, case).save_pretrained(str(tmp_path))
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    only_lin1 = fastpeft.LoraConfig(r=4, target_modules=["lin1"])
    model = fastpeft.inject_adapter_in_model(only_lin1, MODELS["mlp"][0](), state_dict=state)
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert adapted == {"lin0", "lin1"}
    with pytest.raises(ValueError, match="has not"):
        fastpeft.inject_adapter_in_model(only_lin1, MODELS["mlp"][0](), state_dict={"nope.lora_A.weight": state[
            next(iter(state))]})


def test_ephemeral_gpu_offload_is_refused(tmp_path):
    case = next(c for c in ROWS if c.id == "lora-mlp")
    model = trained(fastpeft, case)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        fastpeft.PeftModel.from_pretrained(MODELS["mlp"][0](), str(tmp_path), ephemeral_gpu_offload=True)
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        model.load_adapter(str(tmp_path), "other", ephemeral_gpu_offload=True)
    assert list(model.peft_config) == ["default"]
