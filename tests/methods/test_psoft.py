"""PSOFT (an r x r rotation between frozen SVD factors of the weight) against HF PEFT: files both ways (only R
travels; A and B are rebuilt from the base weight), init and factors, gradients, dropout, merging, several
adapters, mixed batches, bf16, errors. (Rows psoft-* of tests/cases.py also run through the contract and
oracle matrices.)"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.helpers import disable_input_dtype_casting
from fastpeft.methods._shared import orthogonal as orth
from fastpeft.methods.psoft import Linear, PsoftConfig

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("psoft-mlp"),
    "mlp_pissa_free": ("mlp", dict(r=3, target_modules=["lin0", "lin1"], ab_svd_init="pissa_init",
                                   psoft_orth=False, psoft_mag_a=False, psoft_alpha=6)),
    "mlp_neumann": table_row("psoft-mlp-neumann-lowrank"),
    "mlp_neumann_plain": ("mlp", dict(r=5, target_modules=["lin1"], use_cayley_neumann=True,
                                      num_cayley_neumann_terms=2, psoft_mag_a=False, psoft_mag_b=False)),
    "mlp_dropout": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], psoft_dropout=0.3)),
    "mlp_random": ("mlp", dict(r=2, target_modules=["lin0", "head"], init_weights=False)),
    "llama": table_row("psoft-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear",
                                       psoft_orth=False)),
}
TABLE = oh.CaseTable(CASES, PsoftConfig, peft.PsoftConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def psoft_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "_psoft_A_cache")}


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


def test_files_hold_only_r_never_the_factors(tmp_path):
    TABLE.build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{m}.psoft_R.{p}" for m in ("lin0", "lin1")
                    for p in ("vector_a", "vector_b", "weight")]


@pytest.mark.parametrize("case", ["mlp", "mlp_pissa_free", "mlp_neumann", "mlp_random", "llama"])
def test_init_and_factors_match_hf(case):
    """The same seed gives HF PEFT's R, bit-identical A / B (from the same SVD call) and, except with
    init_weights=False, the base model's outputs."""
    ours, theirs = TABLE.fresh(fastpeft, case), TABLE.fresh(peft, case)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours),
                              peft.get_peft_model_state_dict(theirs))
    hf_layers = psoft_layers(theirs)
    for name, layer in psoft_layers(ours).items():
        for attr in ("_psoft_A_cache", "_psoft_B_cache"):
            mine, hf = getattr(layer, attr)["default"], getattr(hf_layers[name], attr)["default"]
            assert mine.dtype == hf.dtype == torch.float32 and torch.equal(mine, hf), (name, attr)
    x = TABLE.inputs(case)
    close(models.forward(ours, x), models.forward(theirs, x), "at init vs HF")
    if case != "mlp_random":
        close(models.forward(ours, x), models.forward(TABLE.base(case), x), "identity at init")


@pytest.mark.parametrize("split", ["psoft_init", "pissa_init"])
def test_factors_span_the_top_singular_subspace(split):
    """scaling * B A is the best rank-r approximation U_r S_r V_r^T of W; psoft_init's A has orthonormal
    rows (so an orthogonal R keeps the lengths inside the subspace)."""
    model = fastpeft.get_peft_model(models.make_mlp(), PsoftConfig(r=4, target_modules=["lin1"],
                                                                  ab_svd_init=split, psoft_alpha=8))
    layer = model.base_model.model.lin1
    a, b = layer._psoft_A_cache["default"], layer._psoft_B_cache["default"]
    u, s, vh = torch.linalg.svd(layer.base_layer.weight.detach())
    close(layer.scaling["default"] * b @ a, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], "B A")
    if split == "psoft_init":
        close(a @ a.t(), torch.eye(4), "orthonormal rows of A")


@pytest.mark.parametrize("case,tol", [("mlp", 1e-6), ("mlp_neumann_plain", None)])
def test_rotation_is_orthogonal(case, tol):
    """The exact Cayley transform of a trained skew matrix is orthogonal; the 2-term Neumann series I + 2Q
    is only close to it (error O(|Q|^2))."""
    model = TABLE.build(fastpeft, case, psoft_mag_a=False, psoft_mag_b=False)
    for layer in psoft_layers(model).values():
        error = orth.orthogonality_error(layer.psoft_R["default"].matrix().detach().unsqueeze(0)).item()
        assert (error < tol) if tol else (1e-4 < error < 0.5), error


@pytest.mark.parametrize("case", ["mlp", "mlp_pissa_free", "mlp_neumann", "llama", "llama_all_linear"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "psoft_R")


def test_dropout_draws_like_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_dropout")
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs("mlp_dropout"), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", ["mlp", "mlp_pissa_free", "mlp_neumann", "mlp_dropout", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, r=2, psoft_alpha=4, target_modules=["lin1"])


def test_adapter_added_after_a_merge_factorises_the_merged_weight_as_hf():
    """A and B come from the weight as it is when the adapter is added: after a merge, the merged one (also
    once that merge is undone, as in HF PEFT)."""
    built = {}
    for lib in (fastpeft, peft):
        model = TABLE.build(lib, "mlp")
        model.base_model.merge_adapter()
        model.add_adapter("other", TABLE.config(lib, "mlp", r=3))
        models.perturb(model, 5, 0.1, wanted=lambda n: ".other." in n)
        model.base_model.unmerge_adapter()
        model.base_model.set_adapter("other")
        built[lib] = model.eval()
    theirs = psoft_layers(built[peft])
    for name, layer in psoft_layers(built[fastpeft]).items():
        close(layer._psoft_B_cache["other"], theirs[name]._psoft_B_cache["other"], f"B of {name}")
    x = TABLE.inputs("mlp")
    close(models.forward(built[fastpeft], x), models.forward(built[peft], x), "second adapter")


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, target_modules=["lin0"])
    x = TABLE.inputs("mlp")[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_delete_adapter_drops_its_factors():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3)
    model.delete_adapter("other")
    for layer in psoft_layers(model).values():
        assert list(layer._psoft_A_cache) == list(layer._psoft_B_cache) == ["default"]
        assert "other" not in layer.r and "other" not in layer.psoft_R


def test_lowrank_svd_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    """psoft_svd='lowrank' draws from its own seeded stream: the global RNG moves no further than with the
    full SVD, and a reload rebuilds the same factors (so the saved R keeps its meaning)."""
    torch.manual_seed(3)
    model = TABLE.build(fastpeft, "mlp_neumann")
    after = torch.randn(3)
    torch.manual_seed(3)
    TABLE.build(fastpeft, "mlp_neumann", psoft_svd="full")
    assert torch.equal(torch.randn(3), after)
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp_neumann"), str(tmp_path)).eval()
    made = psoft_layers(model)
    for name, layer in psoft_layers(loaded).items():
        assert torch.equal(layer._psoft_B_cache["default"], made[name]._psoft_B_cache["default"])
    x = TABLE.inputs("mlp_neumann")
    close(models.forward(loaded, x), models.forward(model, x), "reloaded")


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(ab_svd_init="svd"), "ab_svd_init"),
    (dict(psoft_svd="randomized"), "psoft_svd"),
    (dict(use_cayley_neumann=True, num_cayley_neumann_terms=0), "num_cayley_neumann_terms"),
    (dict(use_cayley_neumann=True, cayley_neumann_eps=1.0), "cayley_neumann_eps"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["lin0"], layers_pattern="layers"), "layers_pattern"),
])
def test_bad_config_is_refused_as_hf(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PsoftConfig(**kwargs)
    with pytest.raises(ValueError):
        peft.PsoftConfig(**kwargs)


@pytest.mark.parametrize("kwargs,option", [
    (dict(psoft_svd_lowrank_niter=3), "psoft_svd_lowrank_niter"),
    (dict(num_cayley_neumann_terms=3), "num_cayley_neumann_terms"),
    (dict(cayley_neumann_eps=0.5), "cayley_neumann_eps"),
])
def test_options_of_a_mode_that_is_off_warn_as_hf(kwargs, option):
    with pytest.warns(UserWarning, match=option):
        PsoftConfig(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PsoftConfig(psoft_svd="lowrank", use_cayley_neumann=True, **kwargs)


def test_oversize_r_names_the_field_and_layer_and_leaves_the_model_untouched():
    """r=12 fits lin0 (10 -> 20) nowhere: the error comes before any layer is built (lin1 would fit)."""
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"PSOFT r=12 does not fit layer 'lin0'.*min\(10, 20\)"):
        fastpeft.get_peft_model(model, PsoftConfig(r=12, target_modules=["lin1", "lin0"]))
    assert not any(isinstance(m, Linear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)
    with pytest.raises(ValueError, match="must be less than or equal"):  # HF PEFT refuses it too
        peft.get_peft_model(models.make_mlp(), peft.PsoftConfig(r=12, target_modules=["lin1", "lin0"]))


def test_oversize_second_adapter_is_refused_and_leaves_the_first():
    model = TABLE.build(fastpeft, "mlp")
    oh.assert_add_adapter_refused(model, "big", TABLE.config(fastpeft, "mlp", target_modules=["head"]),
                                  "r=4 does not fit layer 'head'")


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("emb", ["emb"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear only (a ValueError there)."""
    with pytest.raises(ValueError, match="PSOFT cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](), PsoftConfig(r=2, target_modules=targets))


def test_integer_weights_are_refused_before_building():
    model = models.make_mlp()
    model.lin1.weight = torch.nn.Parameter(model.lin1.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="'lin1'.*torch.int8"):
        fastpeft.get_peft_model(model, PsoftConfig(r=2, target_modules=["lin0", "lin1"]))
    assert not any(isinstance(m, Linear) for m in model.modules())


def test_fan_in_fan_out_is_turned_off_and_unknown_models_need_targets():
    config = PsoftConfig(r=2, target_modules=["lin0"], fan_in_fan_out=True)
    model = fastpeft.get_peft_model(models.make_mlp(), config)
    assert model.peft_config["default"].fan_in_fan_out is False
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), PsoftConfig(r=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """R in fp32 with autocast_adapter_dtype (else bf16), A / B always fp32, outputs and merge as HF PEFT;
    the saved files hold the same dtypes."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp_random"),
                                   autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_input_dtype_casting_can_be_switched_off_as_hf():
    """Factors held in bf16 and a float32 input: casting on, the input is cast to bf16; off, the factors are
    cast to float32 instead. HF PEFT's context manager fails on its PSOFT layers (they lack the attribute it
    reads), so its switch is set by hand."""
    hf, fp = oh.same_adapter_pair(TABLE, "mlp")
    x = TABLE.inputs("mlp")
    for model in (hf, fp):
        for layer in psoft_layers(model).values():
            for factors in (layer._psoft_A_cache, layer._psoft_B_cache):
                factors["default"] = factors["default"].to(torch.bfloat16)
    cast = models.forward(fp, x)
    close(cast, models.forward(hf, x), "casting on")
    for layer in psoft_layers(hf).values():
        layer.cast_input_dtype_enabled = False
    with disable_input_dtype_casting(fp):
        kept = models.forward(fp, x)
    close(kept, models.forward(hf, x), "casting off")
    assert not torch.equal(kept, cast)


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_neumann") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


def test_low_cpu_mem_usage_load_and_oversize_sizes_in_file(tmp_path):
    """R built on the meta device gets the file's values (A and B are rebuilt from the real base weight); an r
    or a Neumann term count no model could hold is refused from the config file before anything is
    allocated."""
    model, x = TABLE.build(fastpeft, "mlp_neumann"), TABLE.inputs("mlp_neumann")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    for field in ("r", "num_cayley_neumann_terms"):
        oh.rewrite_config(tmp_path, **{field: 10**9})
        with pytest.raises(ValueError, match=rf"PsoftConfig.{field}=1000000000 .* is outside"):
            fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
        oh.rewrite_config(tmp_path, **{field: CASES["mlp_neumann"][1][field]})
