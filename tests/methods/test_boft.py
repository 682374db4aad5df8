"""BOFT against HF PEFT 0.21.2: files both ways, outputs, gradients (block dropout too), merging,
butterflies."""

from __future__ import annotations

import peft
import peft.tuners.boft.layer as hf_boft_layer
import pytest
import torch

import fastpeft
from fastpeft.methods._shared import orthogonal as orth
from fastpeft.methods.boft import BOFTConfig
from oft_helpers import (
    BOFT_MODELS,
    BlockDiagKernel,
    close,
    close_states,
    make_square_mlp,
    pair,
    two_adapter_pair,
    two_adapters,
)

import models
from cases import table_row
from oracle_helpers import (
    ModelCaseTable,
    assert_adapter_sets_like_hf,
    assert_differs,
    assert_gradients_like_hf,
    assert_init_like_hf,
    assert_loads_both_ways,
    assert_merge_cycle_like_hf,
    assert_mixed_batch_rows,
)

CASES = {
    "mlp": table_row("boft-mlp"),
    "mlp_dropout": ("mlp", dict(target_modules=["lin0", "lin1"], boft_block_size=2, boft_dropout=0.5)),
    "mlp_blocknum_bias": table_row("boft-mlp-blocknum-bias"),
    "conv2d": table_row("boft-conv2d"),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"],
                            boft_block_size=8)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", boft_block_size=8)),
    # butterflies (> 1 factor) need HF's CUDA kernel: compared with the `hf_butterfly` fixture's stand-in;
    # fastpeft builds one factor and loads HF's N-factor tensors with all N (files both ways:
    # tests/methods/test_boft_butterfly.py)
    "butterfly2": ("square", dict(target_modules=["lin0", "lin1"], boft_block_size=2,
                                  boft_n_butterfly_factor=2)),
    "butterfly3": ("square", dict(target_modules=["lin0", "lin1"], boft_block_size=0, boft_block_num=8,
                                  boft_n_butterfly_factor=3, boft_dropout=0.3)),
}
BUTTERFLY = ["butterfly2", "butterfly3"]


@pytest.fixture(autouse=True)
def hf_butterfly(request, monkeypatch):
    """HF PEFT silently uses one factor without its CUDA extension; butterfly cases give it a PyTorch
    kernel."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("case") in BUTTERFLY:
        monkeypatch.setattr(hf_boft_layer, "get_fbd_cuda", lambda: BlockDiagKernel())


TABLE = ModelCaseTable(CASES, BOFTConfig, peft.BOFTConfig, scale=0.1, model_table=BOFT_MODELS)
build, config, inputs = TABLE.build, TABLE.config, TABLE.inputs
# the boft-* rows of tests/cases.py with these configs: tests/core/test_oracle_matrix.py loads them both ways
ORACLE_MATRIX_ROWS = {"mlp", "mlp_blocknum_bias", "conv2d"}


# ------------------------------------------------------------------------------------------- files, both ways
@pytest.mark.parametrize("case", [c for c in CASES if c not in ORACLE_MATRIX_ROWS and c not in BUTTERFLY])
def test_adapter_files_load_both_ways(case, tmp_path):
    assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_blocknum_bias", "conv2d", "bert"])
def test_saved_files_config_and_init_match_hf(case, tmp_path):
    assert_init_like_hf(TABLE, case, tmp_path, close)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["mlp", "mlp_dropout", "mlp_blocknum_bias", "conv2d", "llama", "butterfly3"])
def test_training_step_gradients_match_hf(case):
    """Same gradients; with boft_dropout the same blocks are dropped (same random draws in the same order)."""
    hf, fp = pair(TABLE, case)
    assert_gradients_like_hf(fp, hf, inputs(case), close, marker="boft_R")
    close_states(fp, hf)


def test_block_dropout_changes_training_outputs_only():
    fp = build(fastpeft, "mlp_dropout")
    x = inputs("mlp_dropout")
    eval_out = models.forward(fp, x)
    fp.train()
    torch.manual_seed(0)
    assert_differs(models.forward(fp, x), eval_out)
    fp.eval()
    close(models.forward(fp, x), eval_out, "eval is deterministic")


def test_bias_boft_only_trains_adapted_biases():
    for lib in (fastpeft, peft):
        model = build(lib, "mlp_blocknum_bias")
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
        assert trainable == [f"base_model.model.{m}.base_layer.bias" for m in ("head", "lin0", "lin1")], lib


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", ["mlp", "mlp_blocknum_bias", "conv2d", "llama", "butterfly2"])
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = pair(TABLE, case)
    assert_merge_cycle_like_hf(fp, hf, inputs(case), close, safe_merge=True)


# ------------------------------------------------------------------------------------------- several adapters
def test_two_adapters_active_merge_and_switching_match_hf():
    hf, fp = two_adapter_pair(TABLE, boft_block_size=4)
    assert_adapter_sets_like_hf(fp, hf, models.mlp_inputs(), close, merged_keeps_outputs=True)


def test_mixed_batch_rows_equal_single_adapter_runs():
    fp = two_adapters(TABLE, fastpeft, boft_block_size=4)
    assert_mixed_batch_rows(fp, models.mlp_inputs()[:3], ["other", "__base__", "default"], close)


# -------------------------------------------------------------------------------------------- math and errors
@pytest.mark.parametrize("case", BUTTERFLY + ["mlp"])
def test_butterfly_rotation_is_orthogonal_and_equals_hf(case):
    hf, fp = pair(TABLE, case)
    ours = fp.base_model.model.lin1.rotation("default")
    theirs, _ = hf.base_model.model.lin1.get_delta_weight("default")
    close(ours, theirs, "rotation")
    assert orth.orthogonality_error(ours.unsqueeze(0)) < 1e-5


def test_butterfly_permutations_equal_hf():
    layer = make_boft_layer()
    for n, blocks, chunk in [(16, 8, 1), (16, 4, 1), (32, 4, 2), (24, 6, 2)]:
        theirs = layer.block_butterfly_perm(n, blocks, chunk, 1)
        assert torch.equal(orth.butterfly_permutation(n, blocks, chunk), theirs), (n, blocks, chunk)


def make_boft_layer():
    hf = peft.get_peft_model(make_square_mlp(), peft.BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    return hf.base_model.model.lin0


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="exactly one of boft_block_num"):
        BOFTConfig(boft_block_size=4, boft_block_num=4)
    with pytest.raises(ValueError, match="bias"):
        BOFTConfig(bias="oft_only")
    with pytest.raises(ValueError, match="boft_n_butterfly_factor"):
        BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="divisible by boft_block_size"):
        fastpeft.get_peft_model(models.make_mlp(), BOFTConfig(target_modules=["lin0"], boft_block_size=3))
    with pytest.raises(ValueError, match="groups=1"):
        fastpeft.get_peft_model(models.make_conv2d(), BOFTConfig(target_modules=["gconv"], boft_block_size=4))
