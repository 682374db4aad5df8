"""LoRA adapters made on transformers v4 MoE models (per-expert `nn.Linear`s) used on the v5 models (stacked
expert parameters), methods/lora/conversion/moe.py, against HF PEFT: converted configs at injection, converted
weights on load, and the v5 layout on save (both directions).

No transformers v4 is installed, so the "v4 adapter" files are written by hand with the keys and shapes HF
PEFT saved on v4 (`...block_sparse_moe.experts.<e>.w1.lora_A.weight` (r, hidden), ...)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.methods.lora.params import ParamLora
from moe_helpers import comparable, make_mixtral, mixtral_inputs, out

ATOL = 1e-5
R, ALPHA = 2, 4


def make_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=12, moe_intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, num_experts=3,
                         num_experts_per_tok=2, max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


def make_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=12, moe_intermediate_size=12,
                         shared_expert_intermediate_size=14, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=3, num_experts_per_tok=2,
                         max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(cfg).eval()


# model -> (factory, v4 MoE block name, v4 expert projections -> which v5 stack they come from)
MODELS = {
    "mixtral": (make_mixtral, "block_sparse_moe", {"w1": "gate", "w3": "up", "w2": "down"}),
    "qwen3_moe": (make_qwen3_moe, "mlp", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}),
    "qwen2_moe": (make_qwen2_moe, "mlp", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}),
}


def v4_shapes(model, layer: int, kind: str) -> tuple[int, int]:
    """(out, in) of a v4 expert linear, read off the v5 stacks: gate_up_proj (E, 2I, H), down_proj (E, H,
    I)."""
    experts = model.model.layers[layer].mlp.experts
    hidden, inter = experts.down_proj.shape[1:]
    return (hidden, inter) if kind == "down" else (inter, hidden)


def v4_adapter(directory, model_id: str, targets: list[str], seed: int = 1, experts=None, **config):
    """Write an adapter folder as HF PEFT saved it on transformers v4 for `targets` (v4 module names)."""
    factory, block, projections = MODELS[model_id]
    model, gen, tensors = factory(), torch.Generator().manual_seed(seed), {}
    num_experts = model.config.num_local_experts if model_id == "mixtral" else model.config.num_experts

    def add(key, out_features, in_features):
        tensors[f"{key}.lora_A.weight"] = torch.randn(R, in_features, generator=gen) * 0.3
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, R, generator=gen) * 0.3

    for i in range(model.config.num_hidden_layers):
        base = f"base_model.model.model.layers.{i}"
        for target in targets:
            if target in projections:
                for e in experts if experts is not None else range(num_experts):
                    add(f"{base}.{block}.experts.{e}.{target}", *v4_shapes(model, i, projections[target]))
                if model_id == "qwen2_moe":  # the shared expert was (and still is) an MLP of nn.Linear
                    add(f"{base}.mlp.shared_expert.{target}",
                        *model.get_submodule(f"model.layers.{i}.mlp.shared_expert.{target}").weight.shape)
            elif target == "gate":
                add(f"{base}.{block}.gate", num_experts, model.config.hidden_size)
            else:  # still an nn.Linear on v5 (attention)
                out_features, in_features = model.get_submodule(
                    f"model.layers.{i}.self_attn.{target}").weight.shape
                add(f"{base}.self_attn.{target}", out_features, in_features)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    data = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA,
            "target_modules": targets, **config}
    (directory / "adapter_config.json").write_text(json.dumps(data))
    return tensors


def inputs():
    return mixtral_inputs()


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def config_view(config) -> dict:
    return {"target_modules": config.target_modules if isinstance(config.target_modules, str)
            else set(config.target_modules or ()),
            "target_parameters": set(config.target_parameters or ()),
            "rank_pattern": dict(config.rank_pattern or {}),
            "alpha_pattern": dict(config.alpha_pattern or {})}


# ---------------------------------------------------------------------------------------- config at injection
CONFIG_CASES = {
    "all_experts_and_attention": ("mixtral", {"target_modules": ["w1", "w3", "w2", "gate", "q_proj"]}),
    "fused_pair_only": ("mixtral", {"target_modules": ["w1", "w3"]}),
    "down_only": ("mixtral", {"target_modules": ["w2"]}),
    "router_only": ("mixtral", {"target_modules": ["gate"]}),
    "dotted_suffixes": ("mixtral", {"target_modules": ["experts.0.w1", "experts.0.w3", "self_attn.v_proj"]}),
    "all_linear": ("mixtral", {"target_modules": "all-linear"}),
    "regex": ("mixtral", {"target_modules": r".*\.(w1|w3|q_proj)"}),
    "regex_down_and_router": ("mixtral", {"target_modules": r".*layers\.1.*\.(w2|gate)"}),
    "params_without_modules": ("mixtral",
                               {"target_modules": None, "target_parameters": ["experts.down_proj"]}),
    "v5_params_kept": ("mixtral", {"target_modules": ["k_proj"],
                                   "target_parameters": ["experts.gate_up_proj"]}),
    "qwen3_all": ("qwen3_moe", {"target_modules": ["gate_proj", "up_proj", "down_proj", "gate", "o_proj"]}),
    "qwen3_all_linear": ("qwen3_moe", {"target_modules": "all-linear"}),
    "qwen3_regex": ("qwen3_moe", {"target_modules": r".*\.(gate_proj|up_proj)"}),
    "qwen2_not_converted": ("qwen2_moe", {"target_modules": ["gate_proj", "up_proj", "down_proj"]}),
    "plain_attention": ("mixtral", {"target_modules": ["q_proj", "v_proj"]}),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_converted_as_hf(case):
    model_id, kwargs = CONFIG_CASES[case]
    factory = MODELS[model_id][0]
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=R, lora_alpha=ALPHA, **kwargs))
    ours = fastpeft.get_peft_model(factory(), fastpeft.LoraConfig(r=R, lora_alpha=ALPHA, **kwargs))
    assert config_view(ours.peft_config["default"]) == config_view(theirs.peft_config["default"])
    shapes = {k: tuple(v.shape) for k, v in lora_state(ours).items()}
    assert shapes == {k: tuple(v.shape) for k, v in lora_state(theirs).items()}
    assert torch.allclose(out(ours, inputs()), out(factory(), inputs()), atol=ATOL)  # identity at init


def test_target_parameters_alone_means_no_default_modules():
    """On a model with a v5 conversion, target_modules=None + target_parameters targets no module (HF
    PEFT)."""
    kwargs = {"target_modules": None, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    ours = fastpeft.get_peft_model(make_mixtral(), fastpeft.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(make_mixtral(), peft.LoraConfig(**kwargs))
    assert ours.peft_config["default"].target_modules == set() == theirs.peft_config["default"].target_modules
    assert {k for k in lora_state(ours)} == {k for k in lora_state(theirs)}
    assert not any("self_attn" in k for k in lora_state(ours))


@pytest.mark.parametrize("targets", [["w1", "q_proj"], ["w3", "w2"]])
def test_half_of_a_fused_pair_is_refused(targets):
    with pytest.raises(ValueError, match="fused"):
        peft.get_peft_model(make_mixtral(), peft.LoraConfig(target_modules=targets))
    missing = "w3" if "w1" in targets else "w1"
    with pytest.raises(ValueError, match=f"'{missing}'.*gate_up_proj"):
        fastpeft.get_peft_model(make_mixtral(), fastpeft.LoraConfig(target_modules=targets))


def test_no_targets_at_all_is_refused_like_hf():
    with pytest.raises(ValueError):
        peft.get_peft_model(make_mixtral(), peft.LoraConfig(target_modules=None))
    with pytest.raises(ValueError, match="neither target_modules nor target_parameters"):
        fastpeft.get_peft_model(make_mixtral(), fastpeft.LoraConfig(target_modules=None))


# -------------------------------------------------------------------------------------------- weights on load
LOAD_CASES = {
    "mixtral_everything": ("mixtral", ["w1", "w3", "w2", "gate", "q_proj", "v_proj"], {}),
    "mixtral_down_and_router": ("mixtral", ["w2", "gate"], {}),
    "mixtral_rslora": ("mixtral", ["w1", "w3", "w2"], {"use_rslora": True}),
    "qwen3_everything": ("qwen3_moe", ["gate_proj", "up_proj", "down_proj", "gate", "k_proj"], {}),
    # HF: no config conversion
    "qwen2_shared_expert_only": ("qwen2_moe", ["gate_proj", "up_proj", "down_proj"], {}),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_v4_adapter_loads_as_in_hf(case, tmp_path):
    model_id, targets, config = LOAD_CASES[case]
    factory = MODELS[model_id][0]
    v4_adapter(tmp_path / "v4", model_id, targets, **config)
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "v4")).eval()
    ours = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path / "v4")).eval()
    assert config_view(ours.peft_config["default"]) == config_view(theirs.peft_config["default"])
    expected = lora_state(theirs)
    got = lora_state(ours)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    logits = out(ours, inputs())
    assert not torch.allclose(logits, out(factory(), inputs()), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits, out(theirs, inputs()), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("case", ["mixtral_everything", "qwen3_everything"])
def test_save_after_conversion_is_v5_both_ways(case, tmp_path):
    model_id, targets, config = LOAD_CASES[case]
    factory = MODELS[model_id][0]
    v4_adapter(tmp_path / "v4", model_id, targets, **config)
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "v4")).eval()
    ours = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path / "v4")).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    files = {name: load_file(str(tmp_path / name / "adapter_model.safetensors"))
             for name in ("ours", "theirs")}
    assert files["ours"].keys() == files["theirs"].keys()
    assert not any(".experts.0." in k or "block_sparse_moe" in k for k in files["ours"])
    for key, value in files["theirs"].items():
        torch.testing.assert_close(files["ours"][key], value, msg=key)
    configs = {name: json.loads((tmp_path / name / "adapter_config.json").read_text())
               for name in ("ours", "theirs")}
    assert comparable(configs["ours"]) == comparable(configs["theirs"])
    expected = out(theirs, inputs())
    hf_from_ours = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "ours")).eval()
    ours_from_hf = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(out(hf_from_ours, inputs()), expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out(ours_from_hf, inputs()), expected, atol=ATOL, rtol=1e-4)


def test_load_adapter_converts_a_second_v4_adapter(tmp_path):
    v4_adapter(tmp_path / "a", "mixtral", ["w1", "w3", "w2"], seed=1)
    v4_adapter(tmp_path / "b", "mixtral", ["w1", "w3", "w2"], seed=2)
    results = []
    for lib in (peft, fastpeft):
        model = lib.PeftModel.from_pretrained(make_mixtral(), str(tmp_path / "a"))
        model.load_adapter(str(tmp_path / "b"), adapter_name="b")
        model.set_adapter("b")
        results.append(out(model.eval(), inputs()))
    torch.testing.assert_close(results[1], results[0], atol=ATOL, rtol=1e-4)


def v4_update(tensors, layer: int, expert: int, proj: str) -> torch.Tensor:
    """s * B @ A of one v4 expert linear, from the file's tensors."""
    key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}"
    return tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * (ALPHA / R)


@pytest.mark.parametrize("targets", [["w1", "w3"], ["w1", "w3", "w2"]])
def test_fused_experts_equal_the_v4_per_expert_updates(targets, tmp_path):
    """The math, straight from the file: expert e of gate_up_proj gets [s B1 A1; s B3 A3], down_proj s B2 A2.

    With only w1 + w3 the gate_up_proj wrapper is the outer one: HF PEFT still writes these weights under the
    inner wrapper's name (so they are not loaded there and the adapter stays at its init); fastpeft uses the
    model's name."""
    tensors = v4_adapter(tmp_path / "v4", "mixtral", targets, seed=4)
    model = fastpeft.PeftModel.from_pretrained(make_mixtral(), str(tmp_path / "v4"))
    wanted = {"gate_up_proj"} | ({"down_proj"} if "w2" in targets else set())
    for layer in range(2):
        outer = model.base_model.model.model.layers[layer].mlp.experts
        wrappers = [outer] + ([outer.base_layer] if isinstance(outer.base_layer, ParamLora) else [])
        assert {w.parameter_name for w in wrappers} == wanted
        for wrapper in wrappers:
            delta = wrapper.delta_weight("default")  # (E, out, in)
            for e in range(3):
                if wrapper.parameter_name == "gate_up_proj":
                    want = torch.cat([v4_update(tensors, layer, e, "w1"), v4_update(tensors, layer, e, "w3")])
                else:
                    want = v4_update(tensors, layer, e, "w2")
                torch.testing.assert_close(delta[e], want)


def test_incomplete_expert_set_is_refused(tmp_path):
    v4_adapter(tmp_path / "v4", "mixtral", ["w2"], experts=[0, 2])
    with pytest.raises(ValueError, match=r"experts \[0, 2\]"):
        fastpeft.PeftModel.from_pretrained(make_mixtral(), str(tmp_path / "v4"))


def test_models_without_conversion_are_untouched(tmp_path):
    from models import make_llama

    model = fastpeft.get_peft_model(make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    config = model.peft_config["default"]
    assert config.target_parameters is None and config.rank_pattern == {}
