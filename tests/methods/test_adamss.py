"""AdaMSS (per-cluster low-rank updates in each weight's top singular subspace, ASA pruning) against HF PEFT:
init, files both ways (the frozen V^T travels in the file, the clusters are rebuilt from the weight),
gradients, merging, several adapters, mixed batches, bf16, the ASA schedule and its Trainer callback, errors.
(Rows adamss-* of tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.adamss import AdamssConfig, AdamssLayer

import models
import oracle_helpers as oh
from cases import table_row

ASA = dict(use_asa=True, init_warmup=1, final_warmup=7, mask_interval=2, asa_target_subspaces=2)
CASES = {
    "mlp": table_row("adamss-mlp"),
    "mlp_defaults": ("mlp", dict(target_modules=["lin0", "lin1"])),  # r=100, K=5: clamped per layer
    "mlp_random_dynamic": table_row("adamss-mlp-random-dynamic"),
    "mlp_head": ("mlp", dict(r=3, num_subspaces=2, subspace_rank=1, target_modules=["head", "lin1"],
                             random_seed=3)),
    "mlp_asa": ("mlp", dict(r=4, num_subspaces=3, subspace_rank=2, target_modules=["lin0", "lin1"], **ASA)),
    "llama": table_row("adamss-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=4, num_subspaces=2,
                                       target_modules="all-linear")),
}
TABLE = oh.CaseTable(CASES, AdamssConfig, peft.AdamssConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", ["mlp", "mlp_defaults", "mlp_random_dynamic", "mlp_head", "llama",
                                  "llama_all_linear"])
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_defaults", "mlp_random_dynamic", "llama"])
def test_init_matches_hf(case):
    """The same global RNG state -> the same V^T, A and B, bit for bit (and the same clusters: the same
    shapes); B = 0 (a no-op) with init_weights='orthogonal'."""
    fresh = TABLE.fresh(fastpeft, case)
    theirs = TABLE.fresh(peft, case)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(fresh),
                              peft.get_peft_model_state_dict(theirs))
    ours_layers = {n: m for n, m in fresh.named_modules() if isinstance(m, AdamssLayer)}
    for name, module in theirs.named_modules():
        if name in ours_layers:
            ours_rows = ours_layers[name].scatter_index["default"].cpu()
            assert torch.equal(ours_rows, module.scatter_index["default"])
    x = TABLE.inputs(case)
    identity = torch.allclose(models.forward(fresh, x), models.forward(TABLE.base(case), x), atol=1e-6)
    assert identity == (case != "mlp_random_dynamic")


def test_init_leaves_the_global_rng_where_hf_does():
    """The cluster-level SVDs and the random B draw from the global RNG as HF PEFT's do (the seeded
    top-level SVD does not touch it): the next draw after get_peft_model is the same."""
    draws = []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        lib.get_peft_model(TABLE.base("mlp"), TABLE.config(lib, "mlp_random_dynamic"))
        draws.append(torch.rand(3))
    assert torch.equal(*draws)


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_asa") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "mlp_random_dynamic", "mlp_head", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "adamss_")


@pytest.mark.parametrize("case", ["mlp", "mlp_head", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    """(mlp: every target has a bias, whose update is the last column of dW' and merges into the bias.)"""
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, r=3, num_subspaces=2, target_modules=["lin1"])


def test_mixed_batch_runs_each_row_with_its_adapter():
    """HF PEFT 0.21 ignores adapter_names for AdaMSS (every row gets the active adapters); here each row
    runs with its own."""
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, target_modules=["lin0"])
    oh.assert_mixed_batch_rows(model, TABLE.inputs("mlp")[:3], ["other", "__base__", "default"], close)


def test_delete_adapter_drops_its_tensors_and_bookkeeping():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3)
    model.delete_adapter("other")
    assert not any(".other" in k for k in model.state_dict())
    layer = model.base_model.model.lin0
    assert "other" not in layer.scatter_index and "other" not in layer.num_subspaces


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """A, B and V^T dtypes (fp32 with autocast_adapter_dtype, else the base's), outputs and merge as HF PEFT;
    the saved files hold the same dtypes."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp_random_dynamic", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp"),
                                   autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


# ---------------------------------------------------------------------------------------------- ASA
def _asa_run(model, x, steps, allocate):
    """`steps` SGD steps on mean(out^2), `allocate(step)` between backward and zero_grad; returns the
    trainable flags after each step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    flags = []
    model.train()
    for step in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        allocate(step)
        opt.zero_grad()
        flags.append({n: p.requires_grad for n, p in model.named_parameters() if "adamss_" in n})
    return flags


def test_update_and_allocate_schedule_matches_hf():
    """Over 10 steps (scoring from step 1, pruning at steps 2, 4, 6 towards 2 of 6 subspaces): the same
    subspaces stop training at the same steps, the same importance EMAs, the same weights at the end. As HF
    PEFT 0.21, a round keeps the subspaces scoring strictly above the budget-th best score: one fewer than
    the budget (budget 2 at step 4: one subspace keeps training)."""
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_asa")
    x = TABLE.inputs("mlp_asa")
    ours = _asa_run(fp, x, 10, fp.base_model.update_and_allocate)
    theirs = _asa_run(hf, x, 10, hf.base_model.update_and_allocate)
    assert ours == theirs
    assert sum(ours[-1].values()) == 2  # one subspace (its A and B) still trains
    assert any(not all(f.values()) for f in ours[:5]), "nothing pruned before the end"
    for name, module in hf.named_modules():
        if hasattr(module, "exp_avg_ipt_A"):
            mine = fp.get_submodule(name)
            for attr in ("exp_avg_ipt_A", "exp_avg_unc_B"):
                for a, b in zip(getattr(mine, attr)["default"], getattr(module, attr)["default"]):
                    assert (a is None) == (b is None)
                    if a is not None:
                        close(a, b, attr)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(fp), peft.get_peft_model_state_dict(hf))


def test_callback_runs_the_schedule_and_hf_import_path_works():
    from fastpeft.tuners.adamss.asa_callback import AdamssAsaCallback

    hf, fp = oh.same_adapter_pair(TABLE, "mlp_asa")
    callback, x = AdamssAsaCallback(), TABLE.inputs("mlp_asa")
    callback.on_train_begin(None, None, None, model=fp)

    def through_callback(step):
        callback.on_optimizer_step(None, SimpleNamespace(global_step=step), None, model=fp)

    assert _asa_run(fp, x, 6, through_callback) == _asa_run(hf, x, 6, hf.base_model.update_and_allocate)
    with pytest.raises(ValueError, match="no AdaMSS adapter"):
        callback.on_train_begin(None, None, None, model=models.make_mlp())


def test_pruned_subspaces_stay_pruned_through_disable_adapter():
    """(HF PEFT 0.21 turns every subspace back on when a disable_adapter() block ends.)"""
    model, x = TABLE.build(fastpeft, "mlp_asa"), TABLE.inputs("mlp_asa")
    flags = _asa_run(model, x, 5, model.base_model.update_and_allocate)[-1]
    assert not all(flags.values())
    with model.disable_adapter():
        model(x)
    assert {n: p.requires_grad for n, p in model.named_parameters() if "adamss_" in n} == flags


def test_update_and_allocate_without_asa_does_nothing():
    model, x = TABLE.build(fastpeft, "mlp"), TABLE.inputs("mlp")
    flags = _asa_run(model, x, 3, lambda step: model.base_model.update_and_allocate(step + 100))
    assert all(flags[-1].values())


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(num_subspaces=0), "num_subspaces must be a positive integer"),
    (dict(subspace_rank=-1), "subspace_rank must be a positive integer"),
    (dict(init_weights="gaussian"), "init_weights"),
    (dict(use_asa=True, mask_interval=0), "mask_interval"),
    (dict(use_asa=True, init_warmup=10, final_warmup=10), "init_warmup"),
    (dict(use_asa=True, asa_target_subspaces=0), "asa_target_subspaces"),
    (dict(use_asa=True, asa_schedule_exponent=0.0), "asa_schedule_exponent"),
    (dict(target_modules=["lin0"], layers_pattern="layers"), "layers_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamssConfig(**kwargs)


def test_asa_options_are_free_without_asa():
    AdamssConfig(mask_interval=0, init_warmup=5, final_warmup=1)  # as HF PEFT: only checked with use_asa


def _untouched(model, before):
    assert not any(isinstance(m, AdamssLayer) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


def test_missing_sklearn_names_the_package_and_leaves_the_model_untouched(monkeypatch):
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TABLE.config(fastpeft, "mlp")  # building the config needs no scikit-learn
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install scikit-learn"):
        fastpeft.get_peft_model(model, config)
    _untouched(model, before)


def test_meta_weight_is_refused_by_layer_name_before_anything_is_built():
    model = models.make_mlp()
    model.lin1.to("meta")
    with pytest.raises(ValueError, match="cannot adapt 'lin1'.*meta device"):
        fastpeft.get_peft_model(model, TABLE.config(fastpeft, "mlp"))
    assert not any(isinstance(m, AdamssLayer) for m in model.modules())


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("emb", ["emb"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear only (a TypeError there)."""
    with pytest.raises(ValueError, match="AdaMSS cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](), AdamssConfig(r=2, target_modules=targets))


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), AdamssConfig(r=2))


def test_low_cpu_mem_usage_load_and_oversize_sizes_in_file(tmp_path):
    """A and B built on the meta device get the file's values (V^T too); a rank or subspace count no model
    could hold is refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, "mlp_random_dynamic"), TABLE.inputs("mlp")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    for field in ("r", "num_subspaces", "subspace_rank"):
        folder = tmp_path / field
        model.save_pretrained(str(folder))
        oh.rewrite_config(folder, **{field: 10**9})
        with pytest.raises(ValueError, match=rf"AdamssConfig.{field}=1000000000 .* is outside"):
            fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(folder))


def test_file_from_another_base_with_other_clusters_is_refused(tmp_path):
    """The clusters are rebuilt from the base weight: a file whose B shapes do not fit them is refused,
    naming the tensors, never loaded into the wrong rows."""
    TABLE.build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    other = models.make_mlp()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(9)
        other.lin1.weight.copy_(torch.randn(other.lin1.weight.shape, generator=gen))
    with pytest.raises(ValueError, match="adamss_B"):
        fastpeft.PeftModel.from_pretrained(other, str(tmp_path))
