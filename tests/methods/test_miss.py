"""MiSS (balance / bat / mini) against HF PEFT: files both ways, init, gradients, merging, several adapters,
bf16, errors. (Rows miss-* of tests/cases.py also run through tests/core/test_oracle_matrix.py.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.miss import MissConfig

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("miss-mlp"),  # lin0: in_features 10 is not a multiple of 4
    "mlp_bat": table_row("miss-mlp-bat"),
    "mlp_bat_bias_all": ("mlp", dict(r=2, target_modules=["lin0", "lin1"], init_weights="bat", bias="all")),
    "mlp_bat_bias_miss_only": ("mlp", dict(r=2, target_modules=["lin0", "lin1"], init_weights="bat",
                                           bias="MiSS_only")),
    "mlp_mini": table_row("miss-mlp-mini"),
    "mlp_random": ("mlp", dict(r=3, target_modules=["lin1", "head"], init_weights=False)),
    "mlp_dropout": ("mlp", dict(r=4, target_modules=["lin1"], miss_dropout=0.3)),
    "llama": table_row("miss-llama"),  # default targets: q_proj, v_proj
    "llama_bat": ("llama", dict(task_type="CAUSAL_LM", r=4, init_weights="bat",
                                target_modules=["q_proj", "v_proj", "down_proj"])),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=8)),  # default targets: q, v
    "t5_mini": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=8, mini_r=4, init_weights="mini")),
}
TABLE = oh.CaseTable(CASES, MissConfig, peft.MissConfig, scale=0.1)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(bias cases: the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_bat", "mlp_mini", "mlp_random"])
def test_init_matches_hf(case):
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case)),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))


# (mlp, mlp_bat, mlp_mini: one SGD step in the oracle matrix)
@pytest.mark.parametrize("case", ["mlp_dropout", "llama_bat", "t5"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "miss_block")


@pytest.mark.parametrize("case,safe", [("mlp", False), ("mlp", True), ("mlp_bat", False), ("mlp_bat", True),
                                       ("mlp_mini", True), ("llama", False), ("llama_bat", True)])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


@pytest.mark.parametrize("case,other", [("mlp", dict(r=3)), ("mlp_bat", dict(r=5, target_modules=["lin1"]))])
def test_two_active_adapters_match_hf(case, other):
    """Two balance adapters of different r (shards padded twice) / two bat adapters applied one after the
    other."""
    oh.assert_two_active_like_hf(TABLE, case, close, **other)


def test_mixed_batch_rows_match_single_adapter_runs():
    fp = oh.build_with_other(TABLE, fastpeft, "mlp", r=2, init_weights="bat")
    with torch.no_grad():
        oh.assert_mixed_batch_rows(fp, TABLE.inputs("mlp"), ["other", "__base__", "default"], close)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(mini_r=0), "mini_r"),
    (dict(init_weights="fancy"), "init_weights"),
    (dict(miss_dropout=1.5), "miss_dropout"),
    (dict(bias="lots"), "bias"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MissConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=12, target_modules=["lin0"]), "exceeds in_features"),
    (dict(r=4, target_modules=["lin0"], init_weights="bat"), "divisible by r=4"),
    (dict(r=4, mini_r=3, target_modules=["lin1"], init_weights="mini"), "mini_r=3"),
])
def test_bad_shapes_are_refused_and_model_untouched(kwargs, match):
    model = models.make_mlp()
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(model, MissConfig(**kwargs))
    assert not any(isinstance(m, fastpeft.methods.miss.Linear) for m in model.modules())


@pytest.mark.parametrize("case", ["mlp", "mlp_bat"])
def test_bf16_base_matches_hf(case):
    """Adapter dtype (fp32 with autocast_adapter_dtype), outputs and merged weights as HF PEFT."""
    oh.assert_bf16_base_like_hf(TABLE, case)
