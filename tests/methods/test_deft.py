"""DEFT (a trained output subspace of each weight removed and replaced) against HF PEFT 0.21.2: files both
ways, seeded init (an identity by default), gradients, dropout, merging with its exact unmerge, several
adapters, mixed batches, bf16, low_cpu_mem_usage, errors. (Rows deft-* of tests/cases.py also run through the
contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.deft import DeftConfig, DeftLinear

import models
import oracle_helpers as oh
from cases import table_row

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": table_row("deft-mlp"),
    "mlp_qr_alpha_bias_only": table_row("deft-mlp-qr-alpha-bias-only"),  # head: r capped at out_features=2
    "mlp_para": table_row("deft-mlp-para"),
    "mlp_random_dropout": ("mlp", dict(r=3, target_modules=["lin0", "lin1"], init_weights=False,
                                       init_scale=5.0, deft_dropout=0.3, alpha=6)),
    "mlp_qr_para_bias_all": ("mlp", dict(r=2, target_modules=["lin1"], decomposition_method="qr",
                                         para=True, bias="all")),
    "mlp_r_capped": ("mlp", dict(r=8, target_modules=["head"], alpha=16)),
    "gpt2_conv1d": table_row("deft-gpt2-conv1d"),
    "llama": table_row("deft-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear_qr": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear",
                                          decomposition_method="qr", exclude_modules=["o_proj"])),
}
TABLE = oh.CaseTable(CASES, DeftConfig, peft.DeftConfig, scale=0.3, init_seed=0)
IDENTITY = ["mlp", "mlp_qr_alpha_bias_only", "mlp_r_capped", "gpt2_conv1d", "llama", "llama_all_linear_qr"]


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(bias cases: the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", list(CASES))
def test_init_matches_hf(case):
    """The same global RNG state -> the same P and R; R = right^T W / s makes the adapter a no-op."""
    fresh, theirs = TABLE.fresh(fastpeft, case).eval(), TABLE.fresh(peft, case).eval()
    ours_sd = fastpeft.get_peft_model_state_dict(fresh)
    oh.assert_same_state_dict(ours_sd, peft.get_peft_model_state_dict(theirs))
    x = TABLE.inputs(case)
    close(models.forward(fresh, x), models.forward(theirs, x), "outputs at init")
    if case in IDENTITY:
        close(models.forward(fresh, x), models.forward(TABLE.base(case), x), "identity at init")


def test_rank_is_capped_at_out_features():
    model = TABLE.fresh(fastpeft, "mlp_r_capped")
    layer = model.base_model.model.head
    assert layer.deft_r["default"] == 2 and layer.deft_scaling["default"] == 8.0
    assert layer.deft_P["default"].shape == (2, 2) and layer.deft_R["default"].shape == (2, 20)


@pytest.mark.parametrize("method", ["relu", "qr"])
def test_forward_is_the_adapted_weight(method):
    """base(x) + update == x W'^T + b with W' = (I - Q right^T) W + s Q R (the paper's form, built whole)."""
    model = TABLE.build(fastpeft, "mlp_random_dropout", decomposition_method=method)
    layer, x = model.base_model.model.lin1, torch.randn(4, 20)
    q, right = layer.project(layer.deft_P["default"], "default")
    w = layer.base_layer.weight
    adapted = (torch.eye(20) - q @ right.T) @ w + layer.deft_scaling["default"] * q @ layer.deft_R["default"]
    close(layer(x), torch.nn.functional.linear(x, adapted, layer.base_layer.bias), "W'")


@pytest.mark.parametrize("case", ["mlp", "mlp_qr_alpha_bias_only", "mlp_para", "gpt2_conv1d", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "deft_")


def test_dropout_draws_like_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_random_dropout")
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs("mlp_random_dropout"), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", ["mlp", "mlp_qr_alpha_bias_only", "mlp_para", "mlp_random_dropout",
                                  "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    """Unmerge restores the base weight although I - P_proj is singular (the merge keeps right^T W)."""
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    """Both adapters merged in one call take their removal from the unmerged weight, as the forward does."""
    oh.assert_two_active_like_hf(TABLE, "mlp", close, r=2, decomposition_method="qr", alpha=3,
                                 target_modules=["lin1"])


def test_adapters_merged_one_after_the_other_match_hf():
    """Merged in two calls, the second removal is taken from the already merged weight (HF PEFT's order);
    unmerging both restores the base."""
    theirs, ours = (oh.build_with_other(TABLE, lib, "mlp", r=2, target_modules=["lin1"])
                    for lib in (peft, fastpeft))
    x, base = TABLE.inputs("mlp"), {n: p.clone() for n, p in ours.base_model.model.named_parameters()}
    for model in (theirs, ours):
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
    close(models.forward(ours, x), models.forward(theirs, x), "merged in two calls")
    ours.unmerge_adapter()
    for name, param in ours.base_model.model.named_parameters():
        if "base_layer" in name:
            close(param, base[name], name)


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, target_modules=["lin0"], para=True)
    x = TABLE.inputs("mlp")[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_mixed_batch_on_merged_adapters_is_refused():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, target_modules=["lin0"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerged"):
        model(TABLE.inputs("mlp")[:2], adapter_names=["default", "other"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(decomposition_method="svd"), "decomposition_method"),
    (dict(deft_dropout=1.5), "deft_dropout"),
    (dict(bias="some"), "bias"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["lin0"], layers_pattern="layers"), "layers_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeftConfig(**kwargs)


@pytest.mark.parametrize("model_name,targets", [("emb", ["emb"]), ("conv2d", ["conv0"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear and Conv1D only (a TypeError there); the model is left untouched."""
    model = models.MODELS[model_name][0]()
    with pytest.raises(ValueError, match="DEFT cannot wrap module"):
        fastpeft.get_peft_model(model, DeftConfig(r=2, target_modules=targets))
    assert not any(isinstance(m, DeftLinear) for m in model.modules())


def test_scaling_layer_is_refused():
    """DEFT has no per-adapter scale (HF PEFT warns and ignores it): set_scale / scale_layer refuse."""
    layer = TABLE.build(fastpeft, "mlp").base_model.model.lin0
    with pytest.raises(NotImplementedError, match="no per-adapter scale"):
        layer.scale_layer(0.5)


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), DeftConfig(r=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """P / R dtypes (fp32 with autocast_adapter_dtype, else the base's), bf16 outputs and merge as HF PEFT;
    the saved files hold the same dtypes and values (R's identity init rounded through bf16 as there)."""
    built = {}
    for lib in (fastpeft, peft):
        torch.manual_seed(0)  # the same P (and R) in both libraries
        base = TABLE.base("mlp").to(torch.bfloat16)
        built[lib] = lib.get_peft_model(base, TABLE.config(lib, "mlp"), autocast_adapter_dtype=autocast)
        built[lib].save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")
    ours, theirs = (models.perturb(built[lib], 0, TABLE.scale).eval() for lib in (fastpeft, peft))
    assert ({n: p.dtype for n, p in ours.named_parameters()}
            == {n: p.dtype for n, p in theirs.named_parameters()})
    x = TABLE.inputs("mlp").to(torch.bfloat16)
    out, expected = models.forward(ours, x), models.forward(theirs, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    for model in (ours, theirs):
        model.merge_adapter()
    merged = dict(theirs.named_parameters())
    for name, weight in ours.named_parameters():
        torch.testing.assert_close(weight, merged[name], atol=5e-4, rtol=1.6e-2, msg=name)


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_qr_alpha_bias_only") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "mlp_para"])
def test_low_cpu_mem_usage_load_and_oversize_r_in_file(case, tmp_path):
    """P and R built on the meta device get the file's values; an r no model could hold is refused from the
    config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, case), TABLE.inputs(case)
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"DeftConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
