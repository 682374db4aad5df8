"""C3A (block-circulant updates by FFT) against HF PEFT: files both ways, init, gradients, merging, mixed
batches, bf16, and the block_size checks. (Rows c3a-* of tests/cases.py also run through the contract and
oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.c3a import C3AConfig, C3ALinear
from fastpeft.methods.c3a.layer import circulant_matrix, circulant_product

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("c3a-mlp"),
    # HF PEFT's own custom-model cases: a per-module block size, each init scheme
    "mlp_pattern": ("mlp", dict(block_size=10, target_modules=["lin0", "lin1"],
                                block_size_pattern={"lin1": 4}, init_weights=False)),
    "mlp_gaussian": ("mlp", dict(block_size=2, target_modules=["lin0"], init_weights="gaussian")),
    "mlp_kaiming": ("mlp", dict(block_size=5, target_modules=["lin1"], init_weights="kaiming_uniform")),
    "mlp_zero": ("mlp", dict(block_size=5, target_modules=["lin0", "lin1"], init_weights=True)),
    "mlp_bias_only": table_row("c3a-mlp-bias-only"),
    "mlp_bias_all": ("mlp", dict(block_size=10, target_modules=["lin0"], bias="all")),
    "llama": table_row("c3a-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", block_size=16, target_modules="all-linear")),
}
TABLE = oh.CaseTable(CASES, C3AConfig, peft.C3AConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def test_fft_product_is_the_dense_circulant_matrix():
    """The FFT path and the dense matrix (merging) agree; block (0, 0) row t is the kernel rotated by t."""
    torch.manual_seed(0)
    kernel, x = torch.randn(3, 2, 4), torch.randn(5, 8)
    close(circulant_product(x, kernel), x @ circulant_matrix(kernel).T, "fft vs dense")
    dense = circulant_matrix(kernel)
    for t in range(4):
        assert torch.equal(dense[t, :4], torch.roll(kernel[0, 0], t))


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(bias cases: the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_pattern", "mlp_gaussian", "mlp_kaiming", "mlp_zero", "llama"])
def test_init_matches_hf(case):
    """The same global RNG state -> the same kernels (zeros for init_weights=True)."""
    ours = fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case))
    oh.assert_same_state_dict(ours, peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))
    assert (case == "mlp_zero") == all(not t.any() for t in ours.values())


def test_identity_only_with_init_weights_true():
    x = TABLE.inputs("mlp")
    base = models.forward(TABLE.base("mlp"), x)
    close(models.forward(TABLE.fresh(fastpeft, "mlp_zero"), x), base, "zero kernels")
    oh.assert_differs(models.forward(TABLE.fresh(fastpeft, "mlp"), x), base)


def test_gradients_are_exact():
    """gradcheck in float64 against finite differences, for the input and the kernel."""
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(circulant_product, (x, kernel))


def test_hf_input_gradient_is_wrong_ours_is_the_dense_one():
    """Why rows with stacked C3A layers set hf_same_gradients=False: HF PEFT 0.21's BlockCircularConvolution
    backward gives a wrong gradient for the input (its kernel gradient is right)."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 4, dtype=torch.float64)
    grad_out = torch.randn(5, 12, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    circulant_product(x, kernel).backward(grad_out)
    ours, x.grad = x.grad, None
    BlockCircularConvolution.apply(x, kernel).backward(grad_out)
    torch.testing.assert_close(ours, grad_out @ circulant_matrix(kernel))
    assert not torch.allclose(x.grad, ours)


# one adapted layer with nothing trainable before it: HF PEFT's wrong input gradient does not reach a
# trained tensor, so every gradient must match
@pytest.mark.parametrize("case", ["mlp_gaussian", "mlp_kaiming", "mlp_bias_only"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "c3a_kernel")


@pytest.mark.parametrize("case", ["mlp", "mlp_pattern", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_add_up_like_hf_merged():
    """Two active adapters add their updates, as merging them does in both libraries. (HF PEFT 0.21's
    unmerged forward feeds the first adapter's output into the second instead, so it disagrees with its own
    merged model; fastpeft follows the merged form.)"""
    theirs, ours = (oh.build_with_other(TABLE, lib, "mlp", block_size=5) for lib in (peft, fastpeft))
    x = TABLE.inputs("mlp")
    both = models.forward(ours, x)
    for name in ("default", "other"):
        theirs.base_model.set_adapter(name)
        ours.base_model.set_adapter(name)
        close(models.forward(ours, x), models.forward(theirs, x), f"only {name}")
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "other"])
        model.merge_adapter(["default", "other"])
    close(models.forward(ours, x), models.forward(theirs, x), "both merged vs HF")
    close(models.forward(ours, x), both, "both merged vs both unmerged")
    ours.unmerge_adapter()
    close(models.forward(ours, x), both, "unmerged again")


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", block_size=10)
    x = TABLE.inputs("mlp")[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(bias="some"), "bias"),
    (dict(init_weights="orthogonal"), "init_weights"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(block_size_pattern=[("lin0", 2)]), "block_size_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C3AConfig(**kwargs)


@pytest.mark.parametrize("kwargs,layer", [
    (dict(block_size=4, target_modules=["lin0", "lin1"]), "lin0"),  # 4 does not divide in=10
    (dict(block_size=10, target_modules=["lin0", "lin1"], block_size_pattern={"lin1": 3}), "lin1"),
    (dict(block_size=5, target_modules=["lin1", "head"]), "head"),  # 5 does not divide out=2
])
def test_block_size_not_dividing_a_layer_names_it_and_leaves_the_model_untouched(kwargs, layer):
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"block_size=\d+ does not divide .* of layer '{layer}'"):
        fastpeft.get_peft_model(model, C3AConfig(**kwargs))
    assert not any(isinstance(m, C3ALinear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


def test_second_adapter_with_bad_block_size_is_refused_without_trace():
    model = TABLE.build(fastpeft, "mlp")
    oh.assert_add_adapter_refused(model, "other", C3AConfig(block_size=20, target_modules=["lin0"]),
                                  "block_size=20 does not divide the input size 10 of layer 'lin0'")


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("conv2d", ["conv0"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear only (a TypeError there)."""
    with pytest.raises(ValueError, match="C3A cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](),
                                C3AConfig(block_size=2, target_modules=targets))


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), C3AConfig(block_size=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast):
    """Kernel dtype (fp32 with autocast_adapter_dtype, else the base's), outputs and merge as HF PEFT."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp", autocast_adapter_dtype=autocast)


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_pattern") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


def test_low_cpu_mem_usage_load_and_oversize_block_size_in_file(tmp_path):
    """Kernels built on the meta device get the file's values; a block_size (or block_size_pattern value) no
    model could hold is refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, "mlp_pattern"), TABLE.inputs("mlp_pattern")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, block_size=10**9)
    with pytest.raises(ValueError, match=r"C3AConfig.block_size=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
    oh.rewrite_config(tmp_path, block_size=10, block_size_pattern={"lin1": 10**9})
    with pytest.raises(ValueError, match="block_size_pattern"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
