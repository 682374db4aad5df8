"""Adapter hot-swapping: in-place weights and scaling, padding for torch.compile, errors, parity with HF
PEFT."""

from __future__ import annotations

import warnings

import peft
import peft.utils.hotswap as hf_hotswap
import pytest
import torch

import fastpeft
from fastpeft.checkpoint.io import load_peft_weights
from fastpeft.hotswap import (
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

from models import MODELS, forward

TARGETS = {
    "mlp": ["lin0", "lin1"],
    "emb": ["emb", "lin"],
    "conv2d": ["conv0", "gconv", "conv1"],  # gconv is a grouped convolution (groups=2)
    "mha": ["mha"],
    "llama": ["q_proj", "v_proj"],
}


def save_adapter(folder, model_name, r, alpha, seed, lib=fastpeft, **options):
    """Save a LoRA adapter with random (non-zero) A and B; `lib` picks who writes it (fastpeft or HF PEFT)."""
    base = MODELS[model_name][0]()
    torch.manual_seed(seed)
    options.setdefault("target_modules", TARGETS[model_name])
    config = lib.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **options)
    lib.get_peft_model(base, config).save_pretrained(str(folder))
    return str(folder)


def load(path, model_name, lib=fastpeft):
    return lib.PeftModel.from_pretrained(MODELS[model_name][0](), path).eval()


def run(model, model_name):
    return forward(model, MODELS[model_name][1]())


def tensor_ids(model):
    return {n: (id(p), p.data_ptr()) for n, p in model.state_dict(keep_vars=True).items()}


def snapshot(model):
    """Everything a hot-swap may change: tensor values and shapes, module identities, LoRA scalings."""
    tensors = {n: p.detach().clone() for n, p in model.state_dict(keep_vars=True).items()}
    modules = {n: id(m) for n, m in model.named_modules()}
    scalings = {n: {k: float(v) for k, v in m.scaling.items()} for n, m in model.named_modules()
                if isinstance(getattr(m, "scaling", None), dict)}
    return tensors, modules, scalings


def assert_unchanged(model, before):
    tensors, modules, scalings = snapshot(model)
    assert modules == before[1] and scalings == before[2]
    assert tensors.keys() == before[0].keys()
    for name, value in tensors.items():
        assert torch.equal(value, before[0][name]), name


# ---------------------------------------------------------------------------------------------- (1) in place
@pytest.mark.parametrize("saver", ["fastpeft", "peft"])
@pytest.mark.parametrize("model_name", ["mlp", "conv2d", "llama"])
def test_hotswap_equals_direct_load_and_keeps_tensors(tmp_path, model_name, saver):
    lib = fastpeft if saver == "fastpeft" else peft
    path_a = save_adapter(tmp_path / "a", model_name, 4, 8, seed=0, lib=lib)
    path_b = save_adapter(tmp_path / "b", model_name, 4, 3, seed=1, lib=lib)
    expected = run(load(path_b, model_name), model_name)
    model = load(path_a, model_name)
    out_a = run(model, model_name)
    ids, modules = tensor_ids(model), {n: id(m) for n, m in model.named_modules()}
    hotswap_adapter(model, path_b, adapter_name="default")
    out = run(model, model_name)
    assert not torch.allclose(out, out_a, atol=1e-4)  # the swap changed something
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert tensor_ids(model) == ids
    assert {n: id(m) for n, m in model.named_modules()} == modules


@pytest.mark.parametrize("model_name", ["emb", "mha"])
def test_hotswap_other_layer_kinds(tmp_path, model_name):
    path_a = save_adapter(tmp_path / "a", model_name, 4, 8, seed=0)
    path_b = save_adapter(tmp_path / "b", model_name, 4, 2, seed=1)
    model = load(path_a, model_name)
    ids = tensor_ids(model)
    hotswap_adapter(model, path_b, "default")
    torch.testing.assert_close(run(model, model_name), run(load(path_b, model_name), model_name),
                               atol=1e-6, rtol=0)
    assert tensor_ids(model) == ids


def test_unprepared_rank_change_keeps_parameter_objects(tmp_path):
    paths = {r: save_adapter(tmp_path / f"r{r}", "mlp", r, 2 * r + 1, seed=r) for r in (2, 4, 8)}
    model = load(paths[4], "mlp")
    params = {n: p for n, p in model.named_parameters()}
    for r in (2, 8, 4):  # smaller (zero-filled in place), larger (tensor grows), back
        hotswap_adapter(model, paths[r], "default")
        torch.testing.assert_close(run(model, "mlp"), run(load(paths[r], "mlp"), "mlp"), atol=1e-6, rtol=0)
        assert all(p is params[n] for n, p in model.named_parameters())
    lora_a = model.base_model.model.lin0.lora_A["default"]
    assert lora_a.out_features == lora_a.weight.shape[0] == 8


def test_subset_of_targets_zeroes_the_rest(tmp_path):
    path_a = save_adapter(tmp_path / "a", "mlp", 4, 8, seed=0)
    path_b = save_adapter(tmp_path / "b", "mlp", 4, 8, seed=1, target_modules=["lin0"])
    model = load(path_a, "mlp")
    hotswap_adapter(model, path_b, "default")
    torch.testing.assert_close(run(model, "mlp"), run(load(path_b, "mlp"), "mlp"), atol=1e-6, rtol=0)
    assert model.base_model.model.lin1.lora_B["default"].weight.abs().sum() == 0


@pytest.mark.parametrize("with_adapter_name", [True, False])
def test_from_state_dict_accepts_model_and_file_keys(tmp_path, with_adapter_name):
    path_a = save_adapter(tmp_path / "a", "mlp", 4, 8, seed=0)
    path_b = save_adapter(tmp_path / "b", "mlp", 4, 8, seed=1)
    state = load_peft_weights(path_b)
    if with_adapter_name:  # the layout HF PEFT's low-level function expects
        state = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    model = load(path_a, "mlp")
    hotswap_adapter_from_state_dict(model, state, "default", fastpeft.LoraConfig.from_pretrained(path_b))
    torch.testing.assert_close(run(model, "mlp"), run(load(path_b, "mlp"), "mlp"), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- (2) prepare
@pytest.mark.parametrize("model_name", ["mlp", "conv2d", "emb", "mha"])
@pytest.mark.parametrize("ranks", [(4, 8), (8, 4)])
def test_prepare_pads_without_changing_outputs(tmp_path, model_name, ranks):
    path_a = save_adapter(tmp_path / "a", model_name, ranks[0], 8, seed=0)
    path_b = save_adapter(tmp_path / "b", model_name, ranks[1], 3, seed=1)
    model = load(path_a, model_name)
    before = run(model, model_name)
    config = model.peft_config["default"]
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=config)
    assert config.r == 8
    torch.testing.assert_close(run(model, model_name), before, atol=1e-6, rtol=0)
    layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert layers and all(isinstance(m.scaling["default"], torch.Tensor) for m in layers)
    ids = tensor_ids(model)
    for path in (path_b, path_a):
        hotswap_adapter(model, path, "default")
        torch.testing.assert_close(run(model, model_name), run(load(path, model_name), model_name), atol=1e-6,
                                   rtol=0)
        assert tensor_ids(model) == ids


def test_prepare_with_patterns_and_rslora(tmp_path):
    options = dict(use_rslora=True, alpha_pattern={"lin1": 5})
    path_a = save_adapter(tmp_path / "a", "mlp", 2, 8, seed=0, **options)
    path_b = save_adapter(tmp_path / "b", "mlp", 8, 3, seed=1, rank_pattern={"lin1": 4}, **options)
    model = load(path_a, "mlp")
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape == (8, 10)
    hotswap_adapter(model, path_b, "default")
    torch.testing.assert_close(run(model, "mlp"), run(load(path_b, "mlp"), "mlp"), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- (3) compile
class CountingBackend:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.parametrize("model_name", ["mlp", "emb"])
def test_compiled_hotswap_needs_no_recompilation_after_prepare(tmp_path, model_name):
    path_a = save_adapter(tmp_path / "a", model_name, 4, 8, seed=0)
    path_b = save_adapter(tmp_path / "b", model_name, 8, 3, seed=1)
    expected = {p: run(load(p, model_name), model_name) for p in (path_a, path_b)}
    torch._dynamo.reset()
    model = load(path_a, model_name)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(run(compiled, model_name), expected[path_a], atol=1e-6, rtol=0)
    assert backend.compiles == 1
    for path in (path_b, path_a, path_b):
        hotswap_adapter(compiled, path, "default")
        torch.testing.assert_close(run(compiled, model_name), expected[path], atol=1e-6, rtol=0)
    assert backend.compiles == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("ranks", [(4, 8), (4, 4)])
def test_compiled_without_prepare_recompiles_on_rank_or_alpha_change(tmp_path, ranks):
    path_a = save_adapter(tmp_path / "a", "mlp", ranks[0], 8, seed=0)
    path_b = save_adapter(tmp_path / "b", "mlp", ranks[1], 3, seed=1)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(load(path_a, "mlp"), backend=backend)
    run(compiled, "mlp")
    hotswap_adapter(compiled, path_b, "default")
    torch.testing.assert_close(run(compiled, "mlp"), run(load(path_b, "mlp"), "mlp"), atol=1e-6, rtol=0)
    assert backend.compiles == 2
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- (4) errors
def _failing_swap(model, call, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, before)


def test_errors_leave_the_model_unchanged(tmp_path):
    path_a = save_adapter(tmp_path / "a", "mlp", 4, 8, seed=0)
    other_targets = save_adapter(tmp_path / "t", "mlp", 4, 8, seed=1, target_modules=["lin0", "lin1", "head"])
    rank8 = save_adapter(tmp_path / "r8", "mlp", 8, 8, seed=2)
    rslora = save_adapter(tmp_path / "rs", "mlp", 4, 8, seed=3, use_rslora=True)
    model = load(path_a, "mlp")
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    _failing_swap(model, lambda: hotswap_adapter(model, other_targets, "default"), RuntimeError,
                  r"lacks.*head.*load_adapter\(\)")
    _failing_swap(model, lambda: hotswap_adapter(model, rank8, "default"), ValueError,
                  r"rank 8.*target_rank >= 8")
    _failing_swap(model, lambda: hotswap_adapter(model, path_a, "other"), ValueError,
                  r"No adapter named 'other'")
    _failing_swap(model, lambda: hotswap_adapter(model, rslora, "default"), ValueError,
                  r"use_rslora.*scaling differently")
    _failing_swap(model, lambda: prepare_model_for_compiled_hotswap(model, target_rank=2), ValueError,
                  r"target_rank=2 is smaller than the rank 4")


def test_wrong_shape_fails_before_any_write(tmp_path):
    path_a = save_adapter(tmp_path / "a", "mlp", 4, 8, seed=0)
    state = load_peft_weights(save_adapter(tmp_path / "b", "mlp", 4, 8, seed=1))
    last = sorted(state)[-1]
    state = {k: state[k] for k in sorted(state)}
    state[last] = torch.zeros(state[last].shape[0] + 1, state[last].shape[1])  # not the rank dimension
    model = load(path_a, "mlp")
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["mlp"])
    _failing_swap(model, lambda: hotswap_adapter_from_state_dict(model, state, "default", config), ValueError,
                  r"different base model")


def test_merged_adapter_is_refused(tmp_path):
    model = load(save_adapter(tmp_path / "a", "mlp", 4, 8, seed=0), "mlp")
    path_b = save_adapter(tmp_path / "b", "mlp", 4, 8, seed=1)
    model.merge_adapter()
    _failing_swap(model, lambda: hotswap_adapter(model, path_b, "default"), ValueError,
                  r"unmerge_adapter\(\)")


def test_method_without_rules_is_refused():
    """Hot-swapping reads the rules from the method's MethodSpec; a method that declares none is named."""
    config = fastpeft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=[])
    model = fastpeft.get_peft_model(MODELS["mlp"][0](), config)
    state = fastpeft.get_peft_model_state_dict(model)
    _failing_swap(model, lambda: hotswap_adapter_from_state_dict(model, state, "default", config), ValueError,
                  r"IA3 adapters cannot be hot-swapped.*declare hot-swap rules.*\(LORA\)")


def test_prepare_checks(tmp_path):
    model = load(save_adapter(tmp_path / "a", "mlp", 4, 8, seed=0), "mlp")
    compiled = torch.compile(model, backend="eager")
    _failing_swap(model, lambda: prepare_model_for_compiled_hotswap(compiled, target_rank=8), ValueError,
                  r"before torch.compile")
    _failing_swap(model, lambda: prepare_model_for_compiled_hotswap(model, check_compiled="maybe"),
                  ValueError, r"'error', 'warn' or 'ignore'")
    _failing_swap(model, lambda: prepare_model_for_compiled_hotswap(MODELS["mlp"][0]()), ValueError,
                  r"No LoRA layers")
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_compiled_hotswap(compiled, check_compiled="ignore")
    assert model.base_model.model.lin0.lora_B["default"].weight.shape == (20, 8)


# ---------------------------------------------------------------------------------------------- (5) HF PEFT
@pytest.mark.parametrize("model_name", ["mlp", "conv2d", "llama"])
@pytest.mark.parametrize("prepare", [False, True])
def test_matches_hf_peft_hotswap(tmp_path, model_name, prepare):
    rank_a, rank_b = (4, 8) if prepare else (8, 4)  # padded and grown vs zero-filled in place
    path_a = save_adapter(tmp_path / "a", model_name, rank_a, 8, seed=0)
    path_b = save_adapter(tmp_path / "b", model_name, rank_b, 3, seed=1)
    ours, theirs = load(path_a, model_name), load(path_a, model_name, lib=peft)
    if prepare:
        prepare_model_for_compiled_hotswap(ours, target_rank=8)
        hf_hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=8)
    hotswap_adapter(ours, path_b, "default")
    hf_hotswap.hotswap_adapter(theirs, path_b, "default", torch_device="cpu")
    torch.testing.assert_close(run(ours, model_name), run(theirs, model_name), atol=1e-6, rtol=0)
