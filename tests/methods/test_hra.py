"""HRA (Householder reflection adaptation) against HF PEFT: files both ways, init, gradients, merging, several
adapters, bf16, errors. (Rows hra-* of tests/cases.py also run through tests/core/test_oracle_matrix.py.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.hra import HRAConfig

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("hra-mlp"),
    "mlp_gs": ("mlp", dict(r=3, target_modules=["lin0", "lin1"], apply_GS=True, init_weights=False)),
    "mlp_random": ("mlp", dict(r=5, target_modules=["lin1"], init_weights=False)),
    "mlp_bias_all": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], bias="all")),
    "mlp_bias_hra_only": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], bias="hra_only")),
    "conv2d": table_row("hra-conv2d"),
    "llama": table_row("hra-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=4)),  # default targets: q, v
}
TABLE = oh.CaseTable(CASES, HRAConfig, peft.HRAConfig, scale=0.1)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(bias cases: the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_random", "conv2d", "llama"])
def test_init_matches_hf(case):
    """The same RNG state -> the same vectors (symmetric pairs for even r, so the identity at start)."""
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case)),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))


# (other configurations: one SGD step in the oracle matrix)
@pytest.mark.parametrize("case", ["mlp_gs", "t5"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "hra_u")


@pytest.mark.parametrize("case", ["mlp", "mlp_gs", "conv2d", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, apply_GS=True, init_weights=False, r=2,
                                 target_modules=["lin1"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(r=4, bias="some"), "bias"),
    (dict(r=4, target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HRAConfig(**kwargs)


@pytest.mark.parametrize("target,match", [("gconv", "groups"), ("conv1", "square")])
def test_unsupported_conv_is_refused_and_model_untouched(target, match):
    model = TABLE.base("conv2d")
    with pytest.raises(NotImplementedError, match=match):
        fastpeft.get_peft_model(model, HRAConfig(r=2, target_modules=["conv0", target]))
    assert not any(isinstance(m, fastpeft.methods.hra.HRALayer) for m in model.modules())


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), HRAConfig(r=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast):
    """Adapter dtype (fp32 with autocast_adapter_dtype, else the base's), outputs and merge as HF PEFT."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp", autocast_adapter_dtype=autocast)
