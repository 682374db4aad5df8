"""PeftMixedModel (get_peft_model(..., mixed=True)) against HF PEFT's: adapters of several methods in one
model, nested on shared targets, one or several active; gradients, merging, unloading, deletion, files both
ways, and the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastpeft
from fastpeft.mixed_model import PeftMixedModel
from fastpeft.tuners.mixed import COMPATIBLE_TUNER_TYPES, MixedModel

from models import forward, llama_inputs, make_llama, make_mlp, mlp_inputs, perturb

ATOL = 1e-5
ADAPTER_PARTS = ("lora_", "hada_", "lokr_", "oft_", "shira_")


def _mlp_specs(lib):
    """LoRA and OFT on both hidden layers, LoHa on one, LoKr on the other: chains of two and three layers."""
    return [("a", lib.LoraConfig(target_modules=["lin0", "lin1"], r=2)),
            ("b", lib.LoHaConfig(target_modules=["lin0"], r=2)),
            ("c", lib.OFTConfig(target_modules=["lin1", "lin0"], r=0, oft_block_size=5)),
            ("d", lib.LoKrConfig(target_modules=["lin1"], r=2)),
            ("e", lib.LoraConfig(target_modules=["lin1"], r=3))]


def _llama_specs(lib):
    return [("a", lib.LoraConfig(target_modules=["q_proj", "v_proj"], r=4)),
            ("b", lib.OFTConfig(target_modules=["q_proj", "o_proj"], r=0, oft_block_size=8)),
            ("c", lib.LoHaConfig(target_modules=["v_proj", "down_proj"], r=2)),
            ("d", lib.LoKrConfig(target_modules=["q_proj"], r=2))]


def _build(lib, base, specs):
    (name, config), *rest = specs
    model = lib.get_peft_model(copy.deepcopy(base), config, adapter_name=name, mixed=True)
    for name, config in rest:
        model.add_adapter(name, config)
    return model


def _is_adapter(name: str) -> bool:
    return any(part in name for part in ADAPTER_PARTS)


def _adapter_keys(model) -> set[str]:
    return {k.replace("base_layer.", "") for k in model.state_dict() if _is_adapter(k)}


def _pair(base, specs, seed=1):
    """(HF PEFT's mixed model, fastpeft's) with the same adapters, moved off their init."""
    hf, fp = _build(peft, base, specs(peft)), _build(fastpeft, base, specs(fastpeft))
    perturb(hf, seed=seed, scale=0.2, wanted=_is_adapter)
    hf_state = hf.state_dict()
    assert set(hf_state) == set(fp.state_dict())  # same modules, same nesting
    fp.load_state_dict(hf_state)
    return hf, fp


def close(actual, expected, what="", atol=ATOL):
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff}"


def _effect(model, base, inputs):
    """How far the adapters move the output from the base model's."""
    return (forward(model, inputs) - forward(base, inputs)).abs().max().item()


@pytest.fixture(scope="module")
def mlp():
    return make_mlp()


@pytest.mark.parametrize("active", [["a"], ["b"], ["c"], ["a", "b"], ["e", "c", "a"],
                                    ["a", "b", "c", "d", "e"]])
def test_outputs_match_hf_with_one_and_several_active(mlp, active):
    hf, fp = _pair(mlp, _mlp_specs)
    x = mlp_inputs()
    hf.set_adapter(active)
    fp.set_adapter(active)
    assert fp.active_adapters == hf.active_adapters
    close(forward(fp, x), forward(hf, x), str(active))
    assert _effect(fp, mlp, x) > 100 * ATOL  # the adapters change the output by far more than the tolerance


def test_nesting_order_and_layers(mlp):
    fp = _build(fastpeft, mlp, _mlp_specs(fastpeft))
    lin1 = fp.base_model.model.lin1
    # newest method outermost; a second LoRA adapter on lin1 wraps the LoKr layer, not the inner LoRA layer
    kinds = []
    layer = lin1
    while hasattr(layer, "base_layer"):
        kinds.append(type(layer).__module__.split(".")[-2])
        layer = layer.base_layer
    assert kinds == ["lora", "lokr", "oft", "lora"]
    assert isinstance(layer, torch.nn.Linear) and lin1.get_base_layer() is layer
    assert isinstance(fp, PeftMixedModel) and isinstance(fp.base_model, MixedModel)


def test_tiny_llama_outputs_and_generate_match_hf():
    base = make_llama()
    hf, fp = _pair(base, _llama_specs)
    inputs = llama_inputs()
    for active in (["a", "b", "c", "d"], ["c", "a"]):
        hf.set_adapter(active)
        fp.set_adapter(active)
        close(forward(fp, inputs), forward(hf, inputs), str(active), atol=1e-4)
    assert _effect(fp, base, inputs) > 1e-2
    ids = inputs["input_ids"][:1, :4]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(fp.generate(input_ids=ids, **kwargs), hf.generate(input_ids=ids, **kwargs))


def test_training_step_gradients_match_hf(mlp):
    hf, fp = _pair(mlp, _mlp_specs)
    x = mlp_inputs()
    for model in (hf, fp):
        model.set_adapter(["a", "b", "c", "d", "e"])
        model.train()
        (model(x) ** 2).mean().backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    fp_grads = {n: p.grad for n, p in fp.named_parameters() if p.requires_grad}
    assert set(fp_grads) == set(hf_grads) and all(_is_adapter(n) for n in fp_grads)
    assert len(fp_grads) >= 10
    for name, grad in hf_grads.items():
        close(fp_grads[name], grad, name)
    assert max(g.abs().max().item() for g in fp_grads.values()) > 100 * ATOL
    trainable, total = fp.get_nb_trainable_parameters()
    assert (trainable, total) == hf.get_nb_trainable_parameters()


def _two_level_specs(lib):
    """Chains of two layers at most, where HF PEFT's merge order is that of its forward."""
    return [("a", lib.LoraConfig(target_modules=["lin0", "lin1"], r=2)),
            ("b", lib.OFTConfig(target_modules=["lin0"], r=0, oft_block_size=5)),
            ("c", lib.LoHaConfig(target_modules=["lin1"], r=2)),
            ("d", lib.LoKrConfig(target_modules=["head"], r=2))]


def test_merge_and_unload_matches_hf(mlp):
    hf, fp = _pair(mlp, _two_level_specs)
    x = mlp_inputs()
    for model in (hf, fp):
        model.set_adapter(["a", "b", "c", "d"])
    unmerged = forward(fp, x)
    hf_merged, fp_merged = hf.merge_and_unload(), fp.merge_and_unload()
    assert not any(hasattr(m, "base_layer") for m in fp_merged.modules())
    close(forward(fp_merged, x), forward(hf_merged, x), "merged vs HF PEFT")
    close(forward(fp_merged, x), unmerged, "merged vs unmerged")
    assert (forward(fp_merged, x) - forward(mlp, x)).abs().max() > 1e-2


def test_merge_and_unload_of_deeper_chains_keeps_outputs(mlp):
    """Chains of three and four layers with an OFT rotation inside: each layer merges after the ones it
    wraps (innermost first), the order of the forward. (HF PEFT 0.21 merges the outermost layer last but the
    others outermost-first, which moves these outputs by ~0.2; fastpeft keeps the unmerged outputs.)"""
    _, fp = _pair(mlp, _mlp_specs)
    x = mlp_inputs()
    fp.set_adapter(["a", "b", "c", "d", "e"])
    unmerged = forward(fp, x)
    close(forward(fp.merge_and_unload(), x), unmerged, "merged vs unmerged")
    assert (unmerged - forward(mlp, x)).abs().max() > 1e-2


def test_merge_adapter_then_unmerge_restores_base_weights(mlp):
    _, fp = _pair(mlp, _mlp_specs)
    x = mlp_inputs()
    fp.set_adapter(["a", "c", "d", "e"])
    expected = forward(fp, x)
    fp.base_model.merge_adapter()
    close(forward(fp, x), expected, "merged", atol=1e-4)
    fp.base_model.unmerge_adapter()
    for name in ("lin0", "lin1"):
        close(fp.get_base_model().get_submodule(name).get_base_layer().weight,
              mlp.get_submodule(name).weight, f"{name} restored")
    close(forward(fp, x), expected, "unmerged")


def test_unload_and_disable_give_the_base_model(mlp):
    _, fp = _pair(mlp, _mlp_specs)
    x = mlp_inputs()
    fp.set_adapter(["a", "b", "c", "d", "e"])
    grads = {n: p.requires_grad for n, p in fp.named_parameters()}
    with fp.disable_adapter():
        close(forward(fp, x), forward(mlp, x), "disabled")
    assert {n: p.requires_grad for n, p in fp.named_parameters()} == grads
    assert _effect(fp, mlp, x) > 1e-2
    plain = fp.unload()
    assert [type(m) for m in plain.modules()] == [type(m) for m in mlp.modules()]
    close(forward(plain, x), forward(mlp, x), "unloaded", atol=0)


def test_delete_adapter_matches_hf(mlp):
    hf, fp = _pair(mlp, _mlp_specs)
    x = mlp_inputs()
    for model in (hf, fp):
        model.set_adapter(["a", "c", "d"])
        model.delete_adapter("c")  # the middle of lin1's chain
    assert sorted(fp.active_adapters) == sorted(hf.active_adapters) == ["a", "d"]
    # HF PEFT keeps the emptied OFT layers in the chains, fastpeft takes them out: same adapter tensors
    assert _adapter_keys(fp) == _adapter_keys(hf)
    assert not any("oft_" in n for n in fp.state_dict())
    close(forward(fp, x), forward(hf, x), "after delete")
    for model in (hf, fp):
        model.delete_adapter(["a", "d"])  # none of the active ones left: HF PEFT activates what remains
    assert sorted(fp.active_adapters) == sorted(hf.active_adapters)
    close(forward(fp, x), forward(hf, x), "after deleting the active adapters")
    with pytest.raises(ValueError, match="not found"):
        fp.delete_adapter("a")


# ---------------------------------------------------------------------------------------------------- files
def _save_each_with_hf(base, specs, folder, seed=3):
    """Each adapter trained alone in an HF PEFT PeftModel and saved; returns {name: path}."""
    paths = {}
    for i, (name, config) in enumerate(specs(peft)):
        model = peft.get_peft_model(copy.deepcopy(base), config)
        perturb(model, seed=seed + i, scale=0.2, wanted=_is_adapter)
        path = folder / name
        model.save_pretrained(path)
        paths[name] = path
    return paths


def _load_mixed(lib, base, paths):
    (first, path), *rest = paths.items()
    model = lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.set_adapter(list(paths))
    return model


def test_hf_files_load_into_fastpeft_mixed_model(mlp, tmp_path):
    paths = _save_each_with_hf(mlp, _mlp_specs, tmp_path)
    hf, fp = _load_mixed(peft, mlp, paths), _load_mixed(fastpeft, mlp, paths)
    x = mlp_inputs()
    close(forward(fp, x), forward(hf, x), "loaded from HF PEFT files")
    assert _effect(fp, mlp, x) > 1e-2  # every adapter was created with identity-like init: the files count


def test_fastpeft_files_load_in_hf_and_back_into_other_weights(mlp, tmp_path):
    _, fp = _pair(mlp, _mlp_specs, seed=5)
    names = [n for n, _ in _mlp_specs(fastpeft)]
    fp.set_adapter(names)
    x = mlp_inputs()
    expected = forward(fp, x)
    fp.save_pretrained(tmp_path)
    paths = {n: tmp_path / n for n in names}
    hf = _load_mixed(peft, mlp, paths)  # keys of inner chain layers are written at the target's path
    close(forward(hf, x), expected, "HF PEFT loads fastpeft's files")
    _, other = _pair(mlp, _mlp_specs, seed=9)  # same adapters, other weights: the load must replace them
    other.set_adapter(names)
    assert (forward(other, x) - expected).abs().max() > 1e-2
    for name, path in paths.items():
        other.load_adapter(path, adapter_name=name)
    other.set_adapter(names)
    close(forward(other, x), expected, "fastpeft loads its files into adapters with other weights")


def _sparse_svd_specs(lib):
    """SHiRA (which, as in HF PEFT, wraps no other adapter layer: added first) with AdaLoRA and LoRA."""
    return [("s", lib.ShiraConfig(target_modules=["lin0", "lin1"], r=2)),
            ("d", lib.AdaLoraConfig(target_modules=["lin1", "head"], init_r=3, total_step=10)),
            ("a", lib.LoraConfig(target_modules=["head"], r=2))]


def test_shira_and_adalora_match_hf(mlp, tmp_path):
    hf, fp = _pair(mlp, _sparse_svd_specs)
    x = mlp_inputs()
    for active in (["s"], ["d"], ["s", "d", "a"]):
        hf.set_adapter(active)
        fp.set_adapter(active)
        close(forward(fp, x), forward(hf, x), str(active))
        assert _effect(fp, mlp, x) > 1e-2
    for model in (hf, fp):
        model.train()
        (model(x) ** 2).mean().backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    assert {n for n, p in fp.named_parameters() if p.requires_grad} == set(hf_grads)
    for name, param in fp.named_parameters():
        if param.requires_grad:
            close(param.grad, hf_grads[name], name)
    paths = _save_each_with_hf(mlp, _sparse_svd_specs, tmp_path)
    close(forward(_load_mixed(fastpeft, mlp, paths), x), forward(_load_mixed(peft, mlp, paths), x),
          "SHiRA / AdaLoRA files of HF PEFT")
    for model in (hf, fp):
        model.eval()
    close(forward(fp.merge_and_unload(), x), forward(hf.merge_and_unload(), x), "merged")


def test_shira_on_an_already_adapted_target_refused(mlp):
    fp = _build(fastpeft, mlp, _mlp_specs(fastpeft)[:1])
    modules = [type(m) for m in fp.modules()]
    with pytest.raises(ValueError, match="SHiRA cannot wrap another method's adapter layer"):
        fp.add_adapter("s", fastpeft.ShiraConfig(target_modules=["lin0", "head"], r=2))
    assert [type(m) for m in fp.modules()] == modules and list(fp.peft_config) == ["a"]


def test_modules_to_save_match_hf_and_travel_in_files(mlp, tmp_path):
    def specs(lib):
        return [("a", lib.LoraConfig(target_modules=["lin0"], r=2, modules_to_save=["head"])),
                ("b", lib.LoHaConfig(target_modules=["lin0", "lin1"], r=2))]

    hf, fp = _pair(mlp, specs)
    perturb(hf, seed=4, wanted=lambda n: "modules_to_save" in n)
    fp.load_state_dict(hf.state_dict())
    x = mlp_inputs()
    for active in (["a"], ["a", "b"]):
        hf.set_adapter(active)
        fp.set_adapter(active)
        close(forward(fp, x), forward(hf, x), str(active))
        assert {n for n, p in fp.named_parameters() if p.requires_grad} == {
            n for n, p in hf.named_parameters() if p.requires_grad}
    assert fp.modules_to_save == hf.modules_to_save == {"head"}
    fp.save_pretrained(tmp_path)
    loaded = _load_mixed(peft, mlp, {"a": tmp_path / "a", "b": tmp_path / "b"})
    close(forward(loaded, x), forward(fp, x), "HF PEFT loads the trained head copy too")
    assert (forward(loaded, x) - forward(mlp, x)).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- refusals
def test_compatible_types_are_the_declared_ones():
    assert set(COMPATIBLE_TUNER_TYPES) == set(peft.tuners.mixed.COMPATIBLE_TUNER_TYPES)


@pytest.mark.parametrize("config", [
    fastpeft.VeraConfig(target_modules=["lin0"], r=2),
    fastpeft.IA3Config(target_modules=["lin0"], feedforward_modules=[]),
    fastpeft.LoraConfig(target_modules=["lin0"], use_dora=True),
    fastpeft.LoraConfig(target_modules=["lin0"], bias="all"),
], ids=["vera", "ia3", "dora", "bias"])
def test_unmixable_adapter_refused_and_model_unchanged(mlp, config):
    fp = _build(fastpeft, mlp, _mlp_specs(fastpeft)[:2])
    before = {n: p.clone() for n, p in fp.state_dict().items()}
    modules = [type(m) for m in fp.modules()]
    with pytest.raises((ValueError, NotImplementedError), match="PeftMixedModel"):
        fp.add_adapter("x", config)
    assert list(fp.peft_config) == ["a", "b"]
    assert [type(m) for m in fp.modules()] == modules
    assert all(torch.equal(p, before[n]) for n, p in fp.state_dict().items()) and len(before) == len(
        fp.state_dict())


def test_prompt_learning_and_unmixable_first_config_refused(mlp):
    prompt = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="prompt-learning"):
        fastpeft.get_peft_model(make_llama(), prompt, mixed=True)
    model = copy.deepcopy(mlp)
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        fastpeft.get_peft_model(model, fastpeft.VeraConfig(target_modules=["lin0"], r=2), mixed=True)
    assert not any(hasattr(m, "base_layer") for m in model.modules())


def test_from_pretrained_of_an_unmixable_file_refused(mlp, tmp_path):
    vera = fastpeft.get_peft_model(copy.deepcopy(mlp), fastpeft.VeraConfig(target_modules=["lin0"], r=2))
    vera.save_pretrained(tmp_path)
    model = copy.deepcopy(mlp)
    with pytest.raises(ValueError, match="'VERA' is not compatible with the `PeftMixedModel`"):
        PeftMixedModel.from_pretrained(model, tmp_path)
    assert [type(m) for m in model.modules()] == [type(m) for m in mlp.modules()]
    assert not hasattr(model, "peft_config")


def test_unsupported_calls_refused(mlp):
    fp = _build(fastpeft, mlp, _mlp_specs(fastpeft)[:2])
    with pytest.raises(NotImplementedError, match="adapter_names"):
        fp(mlp_inputs(), adapter_names=["a"] * 4)
    with pytest.raises(TypeError, match="not supported"):
        fp.get_layer_status()
    with pytest.raises(NotImplementedError):
        fp.base_model.add_weighted_adapter(["a"], [1.0], "w")
    with pytest.raises(ValueError, match="not found"):
        fp.set_adapter(["a", "zz"])


def test_a_peft_model_refused_as_the_base(mlp):
    wrapped = fastpeft.get_peft_model(copy.deepcopy(mlp), fastpeft.LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(ValueError, match="got a PeftModel: pass its base model"):
        fastpeft.get_peft_model(wrapped, fastpeft.LoHaConfig(target_modules=["lin1"], r=2), mixed=True)
    assert list(wrapped.peft_config) == ["default"]


def test_half_precision_base_keeps_the_first_adapter_dtype_as_hf():
    """HF PEFT's mixed model casts only adapters added later (add_adapter), not the first one."""
    def build(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(make_llama().to(torch.bfloat16), lib.LoraConfig(
            target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False), mixed=True)
        model.add_adapter("b", lib.LoHaConfig(target_modules=["q_proj"], r=2, init_weights=False))
        model.set_adapter(["default", "b"])
        return model

    hf, fp = build(peft), build(fastpeft)
    dtypes = {k: v.dtype for k, v in hf.state_dict().items()}
    assert {k: v.dtype for k, v in fp.state_dict().items()} == dtypes
    fp.load_state_dict(hf.state_dict())
    base = forward(make_llama().to(torch.bfloat16), llama_inputs())
    expected = forward(hf, llama_inputs())
    assert (expected - base).abs().max() > 0.1
    close(forward(fp, llama_inputs()), expected, "bf16 mixed logits", atol=0)
