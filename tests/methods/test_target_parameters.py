"""LoRA `target_parameters` (methods/lora/params.py) vs HF PEFT: tiny Mixtral (experts (E, out, in)) and
custom modules holding a 2-D weight (out, in) or a transposed 3-D expert stack (E, in, out)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.methods.lora.params import ParamLora
from moe_helpers import comparable, make_mixtral, mixtral_inputs, out

ATOL = 1e-5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


class Mixer(nn.Module):
    """y = x @ weight.T (weight (out, in)) followed by a transposed expert stack: y_e = y @ stack[e] (E, in,
    out)."""

    def __init__(self, d_in=6, d_out=5, experts=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.stack = nn.Parameter(torch.randn(experts, d_out, 4))
        self.is_transposed = True

    def forward(self, x):
        y = x @ self.weight.T
        return torch.einsum("bi,eio->beo", y, self.stack).flatten(1)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.mix = Mixer()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.mix(x))


def custom_inputs():
    return {"x": torch.randn(4, 6, generator=torch.Generator().manual_seed(3))}


# id -> (factory, inputs, LoraConfig kwargs)
CASES = {
    "mixtral_experts": (make_mixtral, mixtral_inputs, {"target_modules": [], "target_parameters": EXPERTS}),
    "mixtral_with_modules": (make_mixtral, mixtral_inputs,
                             {"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS,
                              "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"gate_up_proj": 5}}),
    "mixtral_one_layer": (make_mixtral, mixtral_inputs,
                          {"target_modules": [],
                           "target_parameters": ["model.layers.1.mlp.experts.down_proj"]}),
    "custom_2d_3d": (Custom, custom_inputs, {
        "target_modules": ["head"], "target_parameters": ["mix.weight", "mix.stack"], "use_rslora": True}),
}


def perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def build(lib, case, seed=0, **extra):
    factory, _, kwargs = CASES[case]
    model = lib.get_peft_model(factory(), lib.LoraConfig(r=2, lora_alpha=4, **kwargs, **extra))
    if seed is not None:
        perturb(model, seed)
    return model.eval()


def saved(directory):
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    config = json.loads((directory / "adapter_config.json").read_text())
    return {k: tuple(v.shape) for k, v in tensors.items()}, config


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init(case):
    factory, inputs_fn, _ = CASES[case]
    model = build(fastpeft, case, seed=None)
    assert any(isinstance(m, ParamLora) for m in model.modules())
    assert torch.allclose(out(model, inputs_fn()), out(factory(), inputs_fn()), atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_to_hf(case, tmp_path):
    inputs = CASES[case][1]()
    ours, theirs = build(fastpeft, case), build(peft, case, seed=None)
    changed = out(ours, inputs)
    assert not torch.allclose(changed, out(CASES[case][0](), inputs), atol=1e-3)  # the adapter does something
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    (keys, config), (hf_keys, hf_config) = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert keys == hf_keys
    assert comparable(config) == comparable(hf_config)
    loaded = peft.PeftModel.from_pretrained(CASES[case][0](), str(tmp_path / "ours")).eval()
    assert torch.allclose(out(loaded, inputs), changed, atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_fastpeft(case, tmp_path):
    inputs = CASES[case][1]()
    theirs = build(peft, case, seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = fastpeft.PeftModel.from_pretrained(CASES[case][0](), str(tmp_path / "theirs")).eval()
    assert torch.allclose(out(loaded, inputs), out(theirs, inputs), atol=ATOL)


@pytest.mark.parametrize("case", ["mixtral_with_modules", "custom_2d_3d"])
def test_only_lora_trains_and_gets_grads(case):
    model = build(fastpeft, case).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".experts." in n or ".mix." in n for n in trainable)
    result = model(**CASES[case][1]())
    (result.logits if hasattr(result, "logits") else result).sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # forward left no parametrization


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload(case):
    inputs = CASES[case][1]()
    model = build(fastpeft, case)
    expected = out(model, inputs)
    with model.disable_adapter():
        assert torch.allclose(out(model, inputs), out(CASES[case][0](), inputs), atol=ATOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ParamLora) or "lora_" in n for n, m in merged.named_modules())
    assert type(merged) is type(CASES[case][0]())
    assert torch.allclose(out(merged, inputs), expected, atol=ATOL)


def test_second_adapter_and_unload():
    inputs = mixtral_inputs()
    model = build(fastpeft, "mixtral_experts")
    model.add_adapter("other", fastpeft.LoraConfig(r=3, target_modules=[], target_parameters=EXPERTS))
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamLora) and isinstance(experts.base_layer, ParamLora)
    assert not isinstance(experts.base_layer.base_layer, ParamLora)  # reused, not nested again
    assert experts.adapter_names() == {"default", "other"}
    first = out(model, inputs)
    model.set_adapter("other")
    assert torch.allclose(out(model, inputs), out(make_mixtral(), inputs), atol=ATOL)  # other starts at zero
    model.set_adapter("default")
    assert torch.allclose(out(model, inputs), first, atol=ATOL)
    plain = model.unload()
    assert torch.allclose(out(plain, inputs), out(make_mixtral(), inputs), atol=ATOL)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_parameters": ["experts.gate_up_projj"]}, "gate_up_proj"),
    ({"target_parameters": EXPERTS, "lora_dropout": 0.1}, "lora_dropout"),
    ({"target_parameters": EXPERTS, "use_dora": True}, "use_dora"),
    ({"target_parameters": EXPERTS, "init_lora_weights": "pissa"}, "pissa"),
])
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(make_mixtral(), fastpeft.LoraConfig(target_modules=[], **kwargs))


def test_unsupported_shape_and_conflicts():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_parameter("scale", nn.Parameter(torch.ones(4)))
    with pytest.raises(ValueError, match="only 2-D"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules=[], target_parameters=["0.scale"]))
    with pytest.raises(ValueError, match="both ways"):
        fastpeft.get_peft_model(nn.Sequential(nn.Linear(4, 4)),
                                fastpeft.LoraConfig(target_modules=["0"], target_parameters=["0.weight"]))
    model = build(fastpeft, "mixtral_experts")
    with pytest.raises(ValueError, match="same parameters"):
        model.add_adapter("x", fastpeft.LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))
    assert set(model.peft_config) == {"default"}
