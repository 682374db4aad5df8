"""GraLoRA against HF PEFT 0.21.2: seeded init, files both ways, outputs, gradients (with dropout), merging,
several adapters, mixed batches, bf16, refusals. (Rows gralora-* of tests/cases.py also run through the
contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.gralora import GraloraConfig, GraloraLinear

import models
import oracle_helpers as oh

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": ("mlp", dict(r=4, gralora_k=2, target_modules=["lin0", "lin1"])),
    "mlp_hybrid": ("mlp", dict(r=4, gralora_k=2, hybrid_r=2, alpha=12, target_modules=["lin0", "lin1"],
                               init_weights=False)),
    "mlp_k5_bias": ("mlp", dict(r=5, gralora_k=5, target_modules=["lin0", "lin1"], bias="gralora_only")),
    "mlp_dropout": ("mlp", dict(r=4, gralora_k=2, hybrid_r=1, gralora_dropout=0.3,
                                target_modules=["lin0", "lin1"])),
    "gpt2_conv1d": ("conv1d_gpt2", dict(r=4, gralora_k=2, target_modules=["c_fc", "c_proj"])),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=8, gralora_k=4, hybrid_r=2)),  # default: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=4, target_modules="all-linear")),
    "gpt2_all_linear": ("gpt2", dict(task_type="CAUSAL_LM", r=4, target_modules="all-linear", bias="all")),
}
TABLE = oh.CaseTable(CASES, GraloraConfig, peft.GraloraConfig, scale=0.3, init_seed=3)


def close(a, b, what="", atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", ["mlp", "mlp_hybrid", "gpt2_conv1d", "llama"])
def test_init_matches_hf(case, tmp_path):
    """The same seed draws the same factors (HF PEFT's order: per block A then B, then the hybrid pair);
    init_weights=True starts at the base model."""
    torch.manual_seed(3)
    oh.assert_init_like_hf(TABLE, case, tmp_path, close, identity=CASES[case][1].get("init_weights", True))
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case)),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF's adapter through fastpeft and back (same keys, tensors, config JSON, outputs); fastpeft's adapter
    in HF PEFT."""
    oh.assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_hybrid", "mlp_dropout", "gpt2_conv1d", "llama"])
def test_training_step_matches_hf(case):
    """Training mode (dropout drawn from the same seed, twice with a hybrid part as HF PEFT): same outputs and
    gradients."""
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_same_training_step(fp, hf, TABLE.inputs(case), lambda a, b, w: close(a, b, w, atol=1e-4))
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), lambda a, b, w: close(a, b, w, atol=1e-4),
                                "gralora_B")


def test_dropout_never_merged():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_dropout")
    oh.assert_dropout_never_merged(fp, hf, TABLE.inputs("mlp_dropout"), close, ["lin0", "lin1"])


@pytest.mark.parametrize("case", ["mlp", "mlp_hybrid", "mlp_k5_bias", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    """Two active adapters (the second with another k / hybrid rank): merged weights and outputs as HF PEFT's,
    unmerge restores the base, merge_and_unload gives HF PEFT's modules and outputs."""
    other = dict(gralora_k=1, hybrid_r=3, bias="none")
    ours, theirs = (oh.build_with_other(TABLE, lib, case, **other) for lib in (fastpeft, peft))
    oh.assert_adapters_merge_like_hf(ours, theirs, TABLE.inputs(case), close)


def test_merged_weight_is_the_block_grid():
    """delta_weight: block (j, n) of the weight is scaling * (A_n[:, j-chunk] @ B_j[n-chunk, :]).T, the
    layout forward uses (checked without HF: an independent loop over the blocks)."""
    model = TABLE.build(fastpeft, "mlp_k5_bias")
    layer = model.base_model.model.lin1
    a, b, k = layer.gralora_A["default"], layer.gralora_B["default"], 5
    s, fin, fout = 1, 20 // k, 20 // k
    want = torch.zeros(20, 20)
    for j in range(k):
        for n in range(k):
            block = a[n][:, j * s:(j + 1) * s] @ b[j][n * s:(n + 1) * s, :]
            want[j * fout:(j + 1) * fout, n * fin:(n + 1) * fin] = block.T
    close(layer.delta_weight("default"), want * layer.scaling["default"], "block grid")
    x = torch.randn(3, 20)
    close(layer.adapter_output("default", x), x @ layer.delta_weight("default").T, "forward = merged form")


def test_adapter_switching_delete_and_mixed_batch_match_hf():
    ours, theirs = (oh.build_with_other(TABLE, lib, "llama", r=4, gralora_k=2, hybrid_r=0)
                    for lib in (fastpeft, peft))
    x = TABLE.inputs("llama")
    oh.assert_adapter_switching_like_hf(ours, theirs, x, models.forward(TABLE.base("llama"), x), close)


def test_mixed_batch_rows_use_their_own_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp_hybrid", gralora_k=5, r=5, hybrid_r=0)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    oh.assert_mixed_batch_rows(model, x, ["other", "default", "__base__", "other"], close)


def test_bf16_base_like_hf():
    oh.assert_bf16_base_like_hf(TABLE, "mlp_hybrid")


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=6, gralora_k=4), "r=6 must be a multiple of gralora_k=4"),
    (dict(gralora_k=0), "gralora_k must be a positive integer"),
    (dict(r=0), "r must be a positive integer"),
    (dict(hybrid_r=-1), "hybrid_r must be a non-negative integer"),
    (dict(bias="some"), "bias='some' is not valid"),
    (dict(target_modules=".*lin0", layers_to_transform=[0]), "layers_to_transform cannot be used"),
])
def test_bad_config_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GraloraConfig(**kwargs)


def test_block_count_not_dividing_a_layer_is_refused_before_anything_is_built():
    """lin0 is 10 -> 20: gralora_k=4 divides 20 but not 10; the error names the field and the layer, and the
    model is left untouched."""
    base = models.make_mlp()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"gralora_k=4 does not divide in_features=10 of layer 'lin0'"):
        fastpeft.get_peft_model(base, GraloraConfig(r=4, gralora_k=4, target_modules=["lin1", "lin0"]))
    assert not any(isinstance(m, GraloraLinear) for m in base.modules())
    oh.assert_same_state_dict(base.state_dict(), before)
    model = TABLE.build(fastpeft, "mlp")
    oh.assert_add_adapter_refused(model, "big", GraloraConfig(r=4, gralora_k=4, target_modules=["lin0"]),
                                  "does not divide in_features=10")


def test_unsupported_layer_types_are_refused():
    with pytest.raises(ValueError, match="GraLoRA cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), GraloraConfig(r=2, gralora_k=2, target_modules=["emb"]))
    with pytest.raises(ValueError, match="GraLoRA cannot wrap module 'conv0'"):
        fastpeft.get_peft_model(models.make_conv2d(), GraloraConfig(r=2, gralora_k=1,
                                                                    target_modules=["conv0"]))


def test_fan_in_fan_out_follows_the_layer_type():
    """Set wrongly for Conv1D layers, it is corrected (as HF PEFT) and the saved config says True."""
    model = fastpeft.get_peft_model(models.make_conv1d_gpt2(),
                                    GraloraConfig(r=2, gralora_k=2, target_modules=["c_fc"]))
    assert model.peft_config["default"].fan_in_fan_out is True
    assert model.base_model.model.c_fc.fan_in_fan_out
