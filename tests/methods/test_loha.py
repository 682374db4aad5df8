"""LoHa against HF PEFT 0.21.2: config and files both ways, outputs, gradients, dropout in training, merging,
several adapters, errors. HF PEFT is the oracle throughout (same base weights, same adapter weights)."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.loha import LoHaConfig

import models
from cases import table_row
from oracle_helpers import (
    CaseTable,
    assert_dropout_draws_like_hf,
    assert_dropout_never_merged,
    assert_init_like_hf,
    assert_loads_both_ways,
    assert_merges_like_hf,
    assert_same_config_json,
    assert_same_training_step,
    assert_two_adapters_like_hf,
)

ATOL = 1e-5

CASES = {
    "mlp": table_row("loha-mlp"),
    "mlp_random_init": ("mlp", dict(target_modules=["lin0", "lin1"], r=2, alpha=3, init_weights=False)),
    "conv1d": ("conv1d", dict(target_modules=["conv0", "conv1"], r=2, alpha=4)),
    "conv1d_effective": ("conv1d", dict(target_modules=["conv0", "conv1"], r=2, use_effective_conv2d=True)),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=3, alpha=6)),
    "conv2d_effective": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=2, alpha=4,
                                        use_effective_conv2d=True)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4, alpha=8)),  # default targets (q_proj, v_proj)
    "llama_patterns": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", r=4,
                                     rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16})),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=2, alpha=4, modules_to_save=["classifier"])),
}
# effective-conv LoHa: HF 0.21.2's hand-written backward of the CP product gets hada_w1_a / hada_w2_a wrong
# (it uses the other term's partial product); fastpeft uses autograd, checked against finite differences below
HF_GRAD_BUG = {"conv1d_effective", "conv2d_effective"}


TABLE = CaseTable(CASES, LoHaConfig, peft.LoHaConfig, scale=0.3)
build, inputs = TABLE.build, TABLE.inputs


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ config
def test_config_fields_defaults_and_json_match_hf(tmp_path):
    assert set(LoHaConfig().to_dict()) == set(peft.LoHaConfig().to_dict())
    kw = dict(r=3, alpha=5, rank_dropout=0.2, module_dropout=0.1, use_effective_conv2d=True,
              init_weights=False, target_modules=["a", "b"], rank_pattern={"a": 2}, alpha_pattern={"b": 7},
              modules_to_save=["head"])
    assert_same_config_json(LoHaConfig(**kw), peft.LoHaConfig(**kw), tmp_path)
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(loaded, LoHaConfig) and loaded.rank_pattern == {"a": 2} and loaded.alpha == 5
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "ours")).use_effective_conv2d is True


# --------------------------------------------------------------------------------------------- init and files
@pytest.mark.parametrize("case", list(CASES))
def test_init_and_saved_files_match_hf(case, tmp_path):
    """Same seed -> the same factors (HF's initialisation order), bitwise the same file tensors, the same
    config (but for "bert": HF PEFT writes `modules_to_save` with the task's "classifier" twice, fastpeft
    once)."""
    identity = TABLE.config(fastpeft, case).init_weights
    assert_init_like_hf(TABLE, case, tmp_path, close, identity, fields=() if case == "bert" else None)
    assert any(".hada_w1_a" in k for k in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))


# "mlp" is the oracle matrix's loha-mlp row (tests/core/test_oracle_matrix.py)
@pytest.mark.parametrize("case", [c for c in CASES if c != "mlp"])
def test_adapter_files_load_both_ways(case, tmp_path):
    assert_loads_both_ways(TABLE, case, tmp_path, close)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("case", ["mlp", "conv1d", "conv2d", "conv2d_effective", "llama"])
def test_gradients_match_hf(case):
    skip = (".hada_w1_a.", ".hada_w2_a.") if case in HF_GRAD_BUG else ()
    assert_same_training_step(build(fastpeft, case), build(peft, case), inputs(case), close, skip=skip)


def test_effective_conv_gradients_are_exact():
    """The CP-form gradients (incl. those HF gets wrong) agree with finite differences of dW."""
    fp = build(fastpeft, "conv2d_effective").double()
    layer = fp.base_model.model.conv0
    factors = tuple(getattr(layer, n)["default"].detach().clone().requires_grad_(True) for n in CP_FACTORS)
    assert torch.autograd.gradcheck(lambda *t: _delta_from(layer, t), factors, fast_mode=True)


CP_FACTORS = ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")


def _delta_from(layer, tensors):
    """LoHa's effective-conv dW as a pure function of its six factors, built by the layer's own code."""
    originals = {n: getattr(layer, n)["default"] for n in CP_FACTORS}
    try:
        for n, t in zip(CP_FACTORS, tensors):
            getattr(layer, n)._parameters["default"] = t  # plain tensors: autograd flows from the inputs
        return layer.full_delta("default")
    finally:
        for n in CP_FACTORS:
            getattr(layer, n)._parameters["default"] = originals[n]


@pytest.mark.parametrize("case", ["mlp", "conv1d", "conv2d", "llama"])
def test_dropout_in_training_matches_hf_under_the_same_seed(case):
    """rank_dropout / module_dropout draw from the same RNG stream as HF PEFT: equal outputs and gradients."""
    extra = dict(rank_dropout=0.5, module_dropout=0.3)
    fp, hf = build(fastpeft, case, **extra), build(peft, case, **extra)
    assert_dropout_draws_like_hf(fp, hf, inputs(case), close, seeds=range(4))


def test_dropout_is_never_merged():
    """Merging in training mode adds the deterministic dW: the merged eval output is the unmerged eval
    output."""
    extra = dict(rank_dropout=0.9, module_dropout=0.9)
    fp, hf = build(fastpeft, "conv2d", **extra), build(peft, "conv2d", **extra)
    assert_dropout_never_merged(fp, hf, inputs("conv2d"), close, targets=("conv0", "gconv", "conv1"))


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("case", ["mlp", "conv1d_effective", "conv2d", "conv2d_effective", "llama_patterns"])
def test_merge_unmerge_and_unload_match_hf(case):
    assert_merges_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close, safe_merge=True)


# ------------------------------------------------------------------------------------------------ adapters
def test_two_adapters_set_disable_delete_match_hf(tmp_path):
    other = dict(r=2, alpha=2, use_effective_conv2d=True)
    assert_two_adapters_like_hf(TABLE, "conv2d", other, tmp_path, close)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0), "positive integer"),
    (dict(rank_pattern={"lin0": -1}), "rank_pattern"),
    (dict(rank_dropout=1.5), "rank_dropout"),
    (dict(alpha_pattern={"lin0": "big"}), "alpha_pattern"),
    (dict(module_dropout=-0.1), "module_dropout"),
    (dict(init_weights="lycoris"), "init_weights"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
])
def test_bad_config_is_refused_clearly(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LoHaConfig(target_modules=["lin0"], **kwargs)


def test_unsupported_module_and_missing_defaults_are_refused():
    with pytest.raises(ValueError, match="cannot wrap module 'emb'.*Linear, Conv1d, Conv2d.*target_modules"):
        fastpeft.get_peft_model(models.make_emb(), LoHaConfig(target_modules=["emb"]))
    with pytest.raises(ValueError, match="no default target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), LoHaConfig())
