"""OFT against HF PEFT 0.21.2: files both ways, outputs, gradients, merging, several adapters,
orthogonality."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods._shared import orthogonal as orth
from fastpeft.methods.oft import OFTConfig
from oft_helpers import (
    close,
    close_states,
    copy_hf_into_fastpeft,
    pair,
    two_adapter_pair,
    two_adapters,
)
from state_helpers import copy_adapter

import models
from cases import table_row
from oracle_helpers import (
    CaseTable,
    assert_adapter_sets_like_hf,
    assert_gradients_like_hf,
    assert_init_like_hf,
    assert_loads_both_ways,
    assert_merge_cycle_like_hf,
    assert_mixed_batch_rows,
)

CASES = {
    "mlp": table_row("oft-mlp"),
    "mlp_exact_r": ("mlp", dict(target_modules=["lin0", "lin1"], r=2, oft_block_size=0,
                                use_cayley_neumann=False)),
    "mlp_coft_share": ("mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=5, coft=True, eps=0.05,
                                   block_share=True, bias="oft_only")),
    "conv2d": ("conv2d", dict(target_modules=["conv0"], oft_block_size=6)),
    "embedding": ("emb", dict(target_modules=["emb", "lin"], oft_block_size=3, num_cayley_neumann_terms=3)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"],
                            oft_block_size=8)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", oft_block_size=8, use_cayley_neumann=False)),
    "llama_layer1": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"],
                                   oft_block_size=8, layers_to_transform=[1], layers_pattern="layers")),
}
# HF PEFT's unmerged OFT Conv2d (kernel > 1) is not its merged convolution: merging there is compared by
# weights only
MERGE_KEEPS_OUTPUTS = ["mlp", "mlp_exact_r", "mlp_coft_share", "embedding", "llama"]


TABLE = CaseTable(CASES, OFTConfig, peft.OFTConfig, scale=0.1)
build, config, inputs = TABLE.build, TABLE.config, TABLE.inputs


# ------------------------------------------------------------------------------------------- files, both ways
# "mlp" is the oracle matrix's oft-mlp row (tests/core/test_oracle_matrix.py)
@pytest.mark.parametrize("case", [c for c in CASES if c != "mlp"])
def test_adapter_files_load_both_ways(case, tmp_path):
    assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_coft_share", "conv2d", "embedding", "bert"])
def test_saved_files_config_and_init_match_hf(case, tmp_path):
    # HF PEFT's unmerged k x k Conv2d path is not the base convolution even with identity rotations (as ours)
    assert_init_like_hf(TABLE, case, tmp_path, close, identity=case != "conv2d")


@pytest.mark.parametrize("case", ["mlp", "embedding"])
def test_random_init_has_hf_shapes_and_scale(case, tmp_path):
    """init_weights=False: normal(0, 0.1) blocks in both libraries (same keys and shapes, similar spread)."""
    saved = {}
    for lib in (fastpeft, peft):
        lib.get_peft_model(TABLE.base(case),
                           config(lib, case, init_weights=False)).save_pretrained(str(tmp_path))
        saved[lib] = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: t.shape for k, t in saved[fastpeft].items()} == {k: t.shape for k, t in saved[peft].items()}
    assert saved[fastpeft] and all(0.03 < t.std().item() < 0.3 for t in saved[fastpeft].values())


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["mlp", "mlp_exact_r", "mlp_coft_share", "conv2d", "embedding", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = pair(TABLE, case)
    assert_gradients_like_hf(fp, hf, inputs(case), close, marker="oft_R")
    # COFT projects the parameters in place during forward: the projected values agree too
    close_states(fp, hf)


def test_bias_oft_only_trains_adapted_biases():
    for lib in (fastpeft, peft):
        model = build(lib, "mlp_coft_share")
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
        assert trainable == ["base_model.model.lin0.base_layer.bias",
                             "base_model.model.lin1.base_layer.bias"], lib


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", MERGE_KEEPS_OUTPUTS + ["conv2d"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = pair(TABLE, case)
    assert_merge_cycle_like_hf(fp, hf, inputs(case), close, safe, keeps_outputs=case in MERGE_KEEPS_OUTPUTS)


def test_hf_unmerge_equals_ours_with_neumann_rotation():
    """Neumann rotations are not exactly orthogonal: unmerge must invert (solve), not transpose, as HF's
    inverse."""
    hf, fp = copy_hf_into_fastpeft(lambda: build(peft, "mlp", seed=3), models.make_mlp,
                                   config(fastpeft, "mlp"))
    with torch.no_grad():
        for model in (hf, fp):
            for n, p in model.named_parameters():
                if "oft_R" in n:
                    p.mul_(6.0)
    blocks = fp.base_model.model.lin0.oft_R["default"].blocks()
    assert orth.orthogonality_error(blocks) > 1e-4
    for model in (hf, fp):
        model.merge_adapter()
        model.unmerge_adapter()
    hf_w = dict(hf.named_parameters())
    for n, p in fp.named_parameters():
        close(p, hf_w[n], n, atol=1e-4)
    close(fp.base_model.model.lin0.base_layer.weight, models.make_mlp().lin0.weight, "restored", atol=1e-4)


# ------------------------------------------------------------------------------------------- several adapters
def test_two_adapters_active_and_switching_match_hf():
    hf, fp = two_adapter_pair(TABLE, oft_block_size=4)
    # (two rotations of one layer do not commute: as in HF, merging both is not the unmerged forward)
    assert_adapter_sets_like_hf(fp, hf, models.mlp_inputs(), close, merged_keeps_outputs=False)


def test_mixed_batch_rows_equal_single_adapter_runs():
    fp = two_adapters(TABLE, fastpeft, oft_block_size=4)
    assert_mixed_batch_rows(fp, models.mlp_inputs()[:3], ["default", "other", "__base__"], close)


def test_delete_adapter_and_reload(tmp_path):
    fp = two_adapters(TABLE, fastpeft, oft_block_size=4)
    x = models.mlp_inputs()
    fp.base_model.set_adapter("other")
    other_out = models.forward(fp, x)
    fp.save_pretrained(str(tmp_path))
    fp.delete_adapter("other")
    assert "other" not in fp.base_model.model.lin1.oft_R
    assert not hasattr(fp.base_model.model.head, "oft_R")
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "other"),
                                                adapter_name="other")
    close(models.forward(loaded.eval(), x), other_out, "reloaded 'other'")


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_rotation_blocks_equal_hf_and_orthogonality(terms):
    """Blocks from our Cayley / Neumann code equal HF's dense block-diagonal get_weight(); exact ones are
    orthogonal."""
    for neumann in (True, False):
        kw = dict(oft_block_size=5, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
        hf, fp = copy_hf_into_fastpeft(lambda kw=kw: build(peft, "mlp", **kw), models.make_mlp,
                                       config(fastpeft, "mlp", **kw))
        ours = fp.base_model.model.lin1.oft_R["default"].blocks()
        theirs = hf.base_model.model.lin1.oft_R["default"].get_weight()
        close(orth.block_diagonal(ours), theirs, f"terms={terms} neumann={neumann}")
        if not neumann:
            assert orth.orthogonality_error(ours) < 1e-5
    small = torch.randn(3, 10) * 0.01
    skew = orth.skew_from_vector(small, 5)
    errors = [orth.orthogonality_error(orth.cayley(skew, n)).item() for n in (2, 5, 9)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_coft_keeps_blocks_inside_the_ball():
    vec = torch.randn(4, 10)
    projected = orth.project_coft(vec, 5, eps=0.1)
    norms = torch.linalg.matrix_norm(orth.skew_from_vector(projected, 5))
    assert (norms <= 0.1 / 2 + 1e-6).all()
    inside = vec * 1e-4
    close(orth.project_coft(inside, 5, eps=0.1), inside, "inside kept")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="exactly one of r"):
        OFTConfig(r=4, oft_block_size=4)
    with pytest.raises(ValueError, match="exactly one of r"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="bias"):
        OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="layers_to_transform"):
        OFTConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="oft_block_size"):
        OFTConfig.from_dict({"peft_type": "OFT", "r": 8})


def test_unsupported_convolutions_are_refused():
    with pytest.raises(ValueError, match="groups > 1"):
        fastpeft.get_peft_model(models.make_conv2d(), OFTConfig(target_modules=["gconv"], oft_block_size=4))
    with pytest.raises(ValueError, match="non-square kernel"):
        fastpeft.get_peft_model(models.make_conv2d(), OFTConfig(target_modules=["conv1"], oft_block_size=4))
    with pytest.raises(ValueError, match="OFT cannot wrap"):
        fastpeft.get_peft_model(models.make_conv1d(), OFTConfig(target_modules=["conv0"], oft_block_size=4))


def test_eval_rotation_is_cached_until_the_parameters_change():
    fp = build(fastpeft, "mlp_exact_r")
    module = fp.base_model.model.lin0.oft_R["default"]
    x = models.mlp_inputs()
    with torch.no_grad():
        first = module.blocks()
        assert module.blocks() is first
        module.weight.add_(0.05)
        changed = module.blocks()
    assert changed is not first and (changed - first).abs().max() > 1e-3
    assert module.blocks().requires_grad  # with gradients wanted: recomputed, part of the graph
    hf = peft.get_peft_model(models.make_mlp(), config(peft, "mlp_exact_r"))
    copy_adapter(fastpeft, fp, peft, hf)
    close(models.forward(fp, x), models.forward(hf.eval(), x), "after the in-place change")


# atol: one ulp of the dtype near 0.3 (the outputs' and weights' size); measured error 0 (HF PEFT's rounding)
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-3), (torch.float16, 2.5e-4)], ids=str)
def test_half_precision_base_matches_hf(dtype, atol):
    """fp32 adapters on a half-precision base (autocast): same outputs and merged weights as HF PEFT."""
    def make():
        return models.make_mlp().to(dtype)

    hf, fp = copy_hf_into_fastpeft(lambda: build_on(peft, make), make, config(fastpeft, "mlp"))
    x = models.mlp_inputs().to(dtype)
    expected = models.forward(hf, x).float()
    with hf.disable_adapter():
        plain = models.forward(hf, x).float()
    assert (expected - plain).abs().max() > 20 * atol  # the adapter's effect: 5e-2
    close(models.forward(fp, x).float(), expected, "half outputs", atol=atol)
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in fp.merge_and_unload().named_parameters():
        close(p.float(), hf_w[n].float(), n, atol=atol)


def build_on(lib, make):
    return models.perturb(lib.get_peft_model(make(), config(lib, "mlp")), 0, 0.1).eval()


def test_old_neumann_adapter_config_is_flagged(caplog):
    data = OFTConfig(target_modules=["lin0"]).to_json_dict()
    with caplog.at_level("WARNING"):
        OFTConfig.from_dict({**data, "peft_version": "0.17.1"})
    assert "PEFT < 0.18" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        OFTConfig.from_dict(data)
    assert "PEFT < 0.18" not in caplog.text
