"""OSF (low singular triplets trained, gradients projected off the frozen top subspace) against HF PEFT: files
both ways, init, gradients with the projection (one step and several optimizer steps), merging, the refusals
(unmerge, disabling a merged model, several active adapters), mixed batches, bad sizes, low_cpu_mem_usage
loads. (Rows osf-* of tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.osf import OSFConfig, OsfLinear

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("osf-mlp"),  # lin0 (20, 10): U side not square; lin1 (20, 20): both square
    "mlp_random_patterns": table_row("osf-mlp-random-patterns"),
    "mlp_fractions_save_head": ("mlp", dict(target_modules=["lin0", "lin1"], effective_rank=0.9,
                                            rank_pattern={"lin1": 0.5}, modules_to_save=["head"])),
    "mlp_all_linear": ("mlp", dict(effective_rank=0.5)),  # no model type: 'all-linear' (the head too)
    "llama": table_row("osf-llama"),  # the model type's default targets
    "llama_patterns": ("llama", dict(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                     rank_pattern={r"layers\.1\.self_attn\.k": 2, "down": 0.75},
                                     init_weights=False)),
}
TABLE = oh.CaseTable(CASES, OSFConfig, peft.OSFConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def osf_layers(model) -> list:
    """(name, layer) of the OSF layers of a model of either library."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (OsfLinear, peft.tuners.osf.OSFLayer))]


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_random_patterns", "llama_patterns"])
def test_init_matches_hf(case):
    """The same SVD split (buffers bit for bit) and, from the same seed, the same random factors; the default
    init changes nothing."""
    ours, theirs = TABLE.fresh(fastpeft, case), TABLE.fresh(peft, case)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours),
                              peft.get_peft_model_state_dict(theirs))
    oh.assert_same_state_dict(dict(ours.named_buffers()), dict(theirs.named_buffers()))
    x = TABLE.inputs(case)
    close(models.forward(ours, x), models.forward(theirs, x), "at init")
    if case == "mlp":
        close(models.forward(ours, x), models.forward(TABLE.base(case), x), "identity at init")


def test_ranks_resolve_per_layer_as_hf():
    """None: half the smaller size; fractions of it; rank_pattern searched in the name (first match)."""
    expected = {"lin0": 3, "lin1": 4}  # 0.3 * 10, rank_pattern 'lin1'
    model = TABLE.fresh(fastpeft, "mlp_random_patterns")
    assert {n.rsplit(".", 1)[-1]: m.effective_rank["default"] for n, m in osf_layers(model)} == expected
    ranks = {n: m.effective_rank["default"] for n, m in osf_layers(TABLE.fresh(fastpeft, "llama_patterns"))}
    theirs = {n: m.effective_rank["default"] for n, m in TABLE.fresh(peft, "llama_patterns").named_modules()
              if isinstance(m, peft.tuners.osf.OSFLayer)}
    assert ranks == theirs
    assert ranks["base_model.model.model.layers.1.self_attn.k_proj"] == 2
    assert ranks["base_model.model.model.layers.1.mlp.down_proj"] == 24  # 0.75 * 32


def test_default_targets_as_hf():
    """llama: HF PEFT's OSF table; a model without a model type: 'all-linear'."""
    for case in ("llama", "mlp_all_linear"):
        ours, theirs = TABLE.fresh(fastpeft, case), TABLE.fresh(peft, case)
        assert ({n for n, _ in osf_layers(ours)}
                == {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.osf.OSFLayer)})
        targets = (set(m.peft_config["default"].target_modules) for m in (ours, theirs))
        assert next(targets) == next(targets)
    assert len(osf_layers(TABLE.fresh(fastpeft, "llama"))) == 14


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_random_patterns") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "mlp_random_patterns", "llama", "llama_patterns"])
def test_training_step_gradients_match_hf(case):
    """HF PEFT projects with hooks on the parameters, fastpeft inside the autograd graph: the same values."""
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "osf_svd_params")


@pytest.mark.parametrize("case", ["mlp", "llama_patterns"])
def test_optimizer_steps_match_hf(case):
    """Five Adam steps: the projected gradients drive the same parameters and outputs."""
    hf, fp = oh.same_adapter_pair(TABLE, case)
    x = TABLE.inputs(case)
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (fp, hf)]
    for _ in range(5):
        for model, opt in zip((fp, hf), optimizers):
            opt.zero_grad()
            oh.gradients(model, x)
            opt.step()
    fp.eval(), hf.eval()
    close(models.forward(fp, x), models.forward(hf, x), "after 5 Adam steps")
    oh.assert_differs(models.forward(fp, x), models.forward(TABLE.base(case), x))


def _top_vectors(layer: OsfLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_high (out, k), V_high (k, in)) from an SVD of the frozen base weight."""
    u, _, vt = torch.linalg.svd(layer.base_layer.weight.detach().float(), full_matrices=False)
    k = layer.effective_rank["default"]
    return u[:, :k], vt[:k, :]


def assert_projected(model, atol: float = 1e-5) -> None:
    """The paper's constraint: U_high^T dU = 0 and dV V_high^T = 0 in every layer (and the gradients are not
    zero); `atol` relative to the largest gradient entry."""
    for name, layer in osf_layers(model):
        params = layer.osf_svd_params["default"]
        u_high, v_high = _top_vectors(layer)
        du, dv = params["U_low"].grad.float(), params["V_low"].grad.float()
        assert du.abs().max() > 1e-7 and dv.abs().max() > 1e-7, name
        # relative to the gradient: float32 rounding of the projection only
        assert (u_high.T @ du).abs().max() < atol * du.abs().max(), f"{name}: dU not orthogonal to U_high"
        assert (dv @ v_high.T).abs().max() < atol * dv.abs().max(), f"{name}: dV not orthogonal to V_high"


@pytest.mark.parametrize("case", ["mlp", "llama_patterns"])
def test_gradients_are_orthogonal_to_the_frozen_subspace(case):
    model = TABLE.build(fastpeft, case)
    oh.gradients(model, TABLE.inputs(case))
    assert_projected(model)


def test_half_precision_base_keeps_the_projection_where_hf_loses_it():
    """HF PEFT 0.21 widens a bf16 base's factors by replacing the parameters, which drops its gradient hooks:
    its OSF then trains without the constraint. fastpeft's projection sits in the graph and holds; the forward
    and dtypes are HF PEFT's."""
    built = {lib: lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp"))
             for lib in (fastpeft, peft)}
    for model in built.values():
        models.perturb(model, 0, 0.1)
    x = TABLE.inputs("mlp").to(torch.bfloat16)
    torch.testing.assert_close(models.forward(built[fastpeft], x), models.forward(built[peft], x))
    for model in built.values():
        oh.gradients(model, x)
    assert_projected(built[fastpeft], atol=1e-2)
    with pytest.raises(AssertionError, match="not orthogonal"):
        assert_projected(built[peft], atol=1e-2)


@pytest.mark.parametrize("case", ["mlp", "mlp_random_patterns", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_and_merge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    x = TABLE.inputs(case)
    expected = models.forward(hf, x)
    for model in (fp, hf):
        model.merge_adapter(safe_merge=safe) if model is fp else model.merge_adapter()
    close(models.forward(fp, x), expected, "merged")
    ours = {n: p for n, p in fp.named_parameters() if "base_layer" in n}
    for name, weight in hf.named_parameters():
        if name in ours:
            close(ours[name], weight, f"merged {name}")
    hf, fp = oh.same_adapter_pair(TABLE, case)
    merged, merged_hf = fp.merge_and_unload(safe_merge=safe), hf.merge_and_unload()
    oh.assert_same_state_dict({k: v for k, v in merged.state_dict().items()},
                              {k: v for k, v in merged_hf.state_dict().items()})


def test_unmerge_and_what_needs_it_are_refused():
    """HF PEFT cannot unmerge OSF (NotImplementedError; its disable_adapter on a merged model silently keeps
    the merged weights): fastpeft refuses unmerge, disabling, deleting the merged adapter and mixed batches,
    each naming OSF, and leaves the merged weights as they were."""
    hf, fp = oh.same_adapter_pair(TABLE, "mlp")
    fp.add_adapter("other", TABLE.config(fastpeft, "mlp"))
    x = TABLE.inputs("mlp")
    with pytest.raises(NotImplementedError, match="unmerg"):
        hf.unmerge_adapter()
    fp.merge_adapter()
    merged = {n: p.detach().clone() for n, p in fp.named_parameters() if "base_layer" in n}
    expected = models.forward(fp, x)
    with pytest.raises(NotImplementedError, match="OSF cannot unmerge"):
        fp.unmerge_adapter()
    with pytest.raises(NotImplementedError, match="merged into the base weights. OSF cannot unmerge"):
        with fp.disable_adapter():
            pass
    with pytest.raises(ValueError, match="OSF adapter 'default' is merged"):
        fp.delete_adapter("default")
    with pytest.raises(ValueError, match="Mixed-adapter batches need unmerged adapters.*OSF cannot unmerge"):
        fp(x, adapter_names=["default", "other", "__base__"])
    for name, param in fp.named_parameters():
        if name in merged:
            assert torch.equal(param, merged[name]), name
    close(models.forward(fp, x), expected, "still merged")


def test_several_active_adapters_are_refused():
    """HF PEFT's forward would run only the first active adapter, its merge all of them."""
    model = TABLE.build(fastpeft, "mlp")
    model.add_adapter("other", TABLE.config(fastpeft, "mlp"))
    with pytest.raises(ValueError, match="OSF runs one adapter at a time"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    layer = model.base_model.model.lin1
    layer.set_adapter(["default", "other"])  # a layer set directly: its forward refuses
    with pytest.raises(ValueError, match="OSF runs one adapter at a time"):
        layer(TABLE.inputs("mlp").new_zeros(2, 20))


def test_two_adapters_like_hf(tmp_path):
    oh.assert_two_adapters_like_hf(TABLE, "mlp", dict(effective_rank=2, target_modules=["lin1"]), tmp_path,
                                   close)


def test_mixed_batch_runs_each_row_with_its_adapter():
    """(HF PEFT 0.21's OSF layers fail on adapter_names; fastpeft runs each row with its adapter.)"""
    model = TABLE.build(fastpeft, "mlp")
    model.add_adapter("other", TABLE.config(fastpeft, "mlp", effective_rank=7, target_modules=["lin0"]))
    models.perturb(model, 5, 0.1, wanted=lambda n: ".other." in n)
    oh.assert_mixed_batch_rows(model.eval(), TABLE.inputs("mlp")[:3], ["other", "__base__", "default"], close)


def test_mixed_batch_training_projects_each_adapter():
    model = TABLE.build(fastpeft, "mlp")
    model.add_adapter("other", TABLE.config(fastpeft, "mlp", effective_rank=4))
    for name, param in model.named_parameters():
        if "osf_svd_params.other" in name:  # both adapters train on their own rows
            param.requires_grad_(True)
    model.train()
    out = model(TABLE.inputs("mlp"), adapter_names=["default", "other", "default"])
    out.pow(2).mean().backward()
    for name, layer in osf_layers(model):
        u, _, vt = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
        for adapter in ("default", "other"):
            k, params = layer.effective_rank[adapter], layer.osf_svd_params[adapter]
            du, dv = params["U_low"].grad, params["V_low"].grad
            assert du.abs().max() > 1e-5 and dv.abs().max() > 1e-5, (name, adapter)
            assert (u[:, :k].T @ du).abs().max() < 1e-5, (name, adapter)
            assert (dv @ vt[:k].T).abs().max() < 1e-5, (name, adapter)


@pytest.mark.parametrize("kwargs,match", [
    (dict(effective_rank=0), "effective_rank must be None, a positive integer"),
    (dict(effective_rank=-2), "effective_rank"),
    (dict(effective_rank=True), "effective_rank"),
    (dict(effective_rank="4"), "effective_rank"),
    (dict(rank_pattern={"lin0": 0}), r"rank_pattern\['lin0'\]"),
    (dict(rank_pattern=[("lin0", 2)]), "rank_pattern must be a dict"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OSFConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(effective_rank=11), r"OSFConfig.effective_rank=11 gives effective_rank 11 for layer 'lin0' "
                              r"\(\(20, 10\) weight\), which allows 1 to 10"),
    (dict(effective_rank=0.05), r"effective_rank=0.05 gives effective_rank 0 for layer 'lin0'"),
    (dict(effective_rank=2, rank_pattern={"in1": 21}), r"OSFConfig.rank_pattern\['in1'\]=21 .* layer 'lin1'"),
])
def test_sizes_that_do_not_fit_a_layer_are_refused_before_anything_is_built(kwargs, match):
    """(HF PEFT clamps an oversize rank to the layer, leaving nothing to train.)"""
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(model, OSFConfig(target_modules=["lin0", "lin1"], **kwargs))
    assert not any(isinstance(m, OsfLinear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("emb", ["emb"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 skips them without a word (a config that adapts nothing)."""
    with pytest.raises(ValueError, match="OSF cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](), OSFConfig(target_modules=targets))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """Factor and buffer dtypes (float32 with autocast_adapter_dtype, else the base's), outputs and merged
    weights as HF PEFT; the files hold the same dtypes."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp_random_patterns", autocast_adapter_dtype=autocast)
    buffers = {}
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp"),
                                   autocast_adapter_dtype=autocast)
        buffers[lib] = {n: b.dtype for n, b in model.named_buffers()}
        model.save_pretrained(str(tmp_path / lib.__name__))
    assert buffers[fastpeft] == buffers[peft]
    assert set(buffers[peft].values()) == {torch.float32 if autocast else torch.bfloat16}
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_low_cpu_mem_usage_load_and_oversize_rank_in_file(tmp_path):
    """Factors built on the meta device get the file's values (the frozen SVD buffers come from the real base
    weight) and train with the projection (HF PEFT's meta load replaces the parameters and drops its hooks);
    an effective_rank no layer of the model allows, written into the config file, is refused naming the field
    and the layer."""
    model, x = TABLE.build(fastpeft, "mlp_random_patterns"), TABLE.inputs("mlp_random_patterns")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True,
                                                is_trainable=True)
    assert not any(p.is_meta for p in loaded.parameters())
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.gradients(loaded, x)
    assert_projected(loaded)
    oh.rewrite_config(tmp_path, effective_rank=10**9, rank_pattern=None)
    with pytest.raises(ValueError, match=r"effective_rank=1000000000 .* layer 'lin0'"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


def test_meta_base_weight_is_refused():
    """The frozen subspace is the weight's SVD: a base without values cannot be adapted."""
    with torch.device("meta"):
        model = models.MLP()
    with pytest.raises(ValueError, match="OSF needs the values of the weight of 'lin0'"):
        fastpeft.get_peft_model(model, OSFConfig(target_modules=["lin0"]))


def test_overlapping_rank_patterns_warn(caplog):
    """Two patterns with different ranks in one name: the first wins (HF PEFT's rule), but the saved config's
    keys are sorted, so a reload may pick the other: said once per layer."""
    config = OSFConfig(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 4, "in": 2})
    with caplog.at_level("WARNING"):
        model = fastpeft.get_peft_model(models.make_mlp(), config)
    assert model.base_model.model.lin1.effective_rank["default"] == 4
    assert "several patterns with different ranks match 'lin1'" in caplog.text
    assert "match 'lin0'" not in caplog.text
