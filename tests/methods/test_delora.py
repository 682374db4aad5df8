"""DeLoRA (rank-r update with a trained norm bound) against HF PEFT: files both ways (the frozen column norms
travel in the file), init, gradients, dropout, merging, several adapters, mixed batches, bf16, errors. (Rows
delora-* of tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.delora import DeloraConfig, DeloraLinear

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("delora-mlp"),
    "mlp_random": ("mlp", dict(r=2, target_modules=["lin1"], init_weights=False)),
    "mlp_patterns": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2},
                                 lambda_pattern={"lin0": 5}, delora_lambda=3)),
    "mlp_dropout": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], module_dropout=0.3)),
    "mlp_bias_only": table_row("delora-mlp-bias-only"),
    "mlp_bias_all": ("mlp", dict(r=2, target_modules=["lin0"], bias="all")),
    "llama": table_row("delora-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")),
}
TABLE = oh.CaseTable(CASES, DeloraConfig, peft.DeloraConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(bias cases: the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_random", "mlp_patterns", "llama"])
def test_init_matches_hf(case):
    """The same global RNG state -> the same A, B, lambda and column norms; B = 0 (a no-op) by default."""
    fresh = TABLE.fresh(fastpeft, case)
    ours = fastpeft.get_peft_model_state_dict(fresh)
    oh.assert_same_state_dict(ours, peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))
    if case != "mlp_random":
        x = TABLE.inputs(case)
        close(models.forward(fresh, x), models.forward(TABLE.base(case), x), "identity at init")


def test_column_norms_come_from_the_file(tmp_path):
    """The saved delora_w_norm is used as it is, not recomputed from the (here different) base weights."""
    theirs, x = TABLE.build(peft, "mlp"), TABLE.inputs("mlp")
    with torch.no_grad():
        for module in theirs.modules():
            if hasattr(module, "delora_w_norm"):
                module.delora_w_norm["default"].mul_(1.5)
    expected = models.forward(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path)).eval()
    close(models.forward(ours, x), expected, "w_norm from the file")


def test_update_norm_is_bounded_by_lambda():
    """|dW|_F <= lambda * max_j |W[:, j]| (the paper's bound), whatever A and B are."""
    model = TABLE.build(fastpeft, "mlp_random", seed=1)
    layer = model.base_model.model.lin1
    bound = layer.delora_lambda["default"].abs() * layer.delora_w_norm["default"].max()
    assert layer.delta_weight("default").norm() <= bound.item() + 1e-5


@pytest.mark.parametrize("case", ["mlp", "mlp_patterns", "mlp_bias_only", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "delora_")


def test_dropout_draws_like_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_dropout")
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs("mlp_dropout"), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", ["mlp", "mlp_patterns", "mlp_dropout", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, r=2, delora_lambda=4, target_modules=["lin1"])


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, target_modules=["lin0"])
    x = TABLE.inputs("mlp")[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_delete_adapter_drops_its_column_norms():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3)
    model.delete_adapter("other")
    assert not any(".other" in k for k in model.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(bias="some"), "bias"),
    (dict(module_dropout=1.5), "module_dropout"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["lin0"], layers_pattern="layers"), "layers_pattern"),
    (dict(rank_pattern=[("lin0", 2)]), "rank_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeloraConfig(**kwargs)


def test_bad_rank_from_pattern_names_the_layer_and_leaves_the_model_untouched():
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="r must be a positive integer, got 0 for 'lin1'"):
        fastpeft.get_peft_model(model, DeloraConfig(target_modules=["lin0", "lin1"],
                                                    rank_pattern={"lin1": 0}))
    assert not any(isinstance(m, DeloraLinear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("emb", ["emb"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear only (a TypeError there)."""
    with pytest.raises(ValueError, match="DeLoRA cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](), DeloraConfig(r=2, target_modules=targets))


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), DeloraConfig(r=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """Parameter and column-norm dtypes (fp32 with autocast_adapter_dtype, else the base's), outputs and merge
    as HF PEFT; the saved files hold the same dtypes."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp_random", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp"),
                                   autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_patterns") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


def test_low_cpu_mem_usage_load_and_oversize_r_in_file(tmp_path):
    """A, B and lambda built on the meta device get the file's values (the column norms too); an r no model
    could hold is refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, "mlp_patterns"), TABLE.inputs("mlp_patterns")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"DeloraConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
