"""RoAd (scaled 2x2 rotations of output feature pairs) against HF PEFT: files both ways, init, gradients,
merging (the closed-form inverse for unmerging), several adapters, per-row adapter_names (one vectorised pass)
against HF PEFT's, bf16, errors, bitsandbytes 4 / 8-bit layers. (Rows road-* of tests/cases.py also run
through the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.road import Linear, RoadConfig
from fastpeft.methods.road.layer import coefficients, inverse_coefficients, rotate

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("road-mlp"),
    "mlp_road2": ("mlp", dict(variant="road_2", group_size=10, target_modules=["lin0", "lin1"])),
    "mlp_road4": table_row("road-mlp-road4"),
    "mlp_random": ("mlp", dict(variant="road_4", group_size=20, target_modules=["lin1"], init_weights=False)),
    "llama": table_row("road-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", group_size=8, variant="road_2",
                                       target_modules="all-linear")),
}
TABLE = oh.CaseTable(CASES, RoadConfig, peft.RoadConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_elementwise_rotation_is_the_dense_block_matrix(variant):
    """h * diag + swap(h) * cross equals R @ h with R built entry by entry from the paper's 2x2 blocks, and
    the closed-form inverse undoes it."""
    torch.manual_seed(0)
    g, out = 6, 12
    n = {"road_1": out // 2, "road_2": out, "road_4": 2 * out}[variant]
    diag, cross = coefficients(variant, g, torch.randn(n), torch.randn(n))
    dense = torch.zeros(out, out)
    for start in range(0, out, g):
        for k in range(g // 2):
            i, j = start + k, start + k + g // 2
            dense[i, i], dense[i, j], dense[j, i], dense[j, j] = diag[i], -cross[i], cross[j], diag[j]
    h = torch.randn(3, out)
    close(rotate(h, diag, cross, g), h @ dense.T, "elementwise vs dense")
    inv_diag, inv_cross = inverse_coefficients(diag, cross, g)
    close(rotate(rotate(h, diag, cross, g), inv_diag, inv_cross, g), h, "inverse")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_road2", "mlp_road4", "mlp_random", "llama"])
def test_init_matches_hf(case):
    """The same global RNG state -> the same angles and scales; the default init (0, 1) is a no-op."""
    fresh = TABLE.fresh(fastpeft, case)
    ours = fastpeft.get_peft_model_state_dict(fresh)
    oh.assert_same_state_dict(ours, peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))
    x = TABLE.inputs(case)
    if case != "mlp_random":
        assert torch.equal(models.forward(fresh, x), models.forward(TABLE.base(case), x))


@pytest.mark.parametrize("case", ["mlp", "mlp_road4", "llama"])
def test_outputs_are_bitwise_hf_outputs(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    x = TABLE.inputs(case)
    assert torch.equal(models.forward(fp, x), models.forward(hf, x))


@pytest.mark.parametrize("case", ["mlp", "mlp_road2", "mlp_road4", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "road_")


@pytest.mark.parametrize("case", ["mlp", "mlp_road2", "mlp_random", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_compose_like_hf():
    """Two active adapters rotate one after the other (merged too); a second group size and variant."""
    oh.assert_two_active_like_hf(TABLE, "mlp", close, variant="road_4", group_size=4, init_weights=False)


def _with_adapters(lib):
    """The llama model with three adapters: two of group size 8 (one vectorised pass), one of group size 4."""
    model = TABLE.build(lib, "llama")
    for seed, (name, extra) in enumerate([("other", dict(variant="road_2")),
                                          ("small", dict(variant="road_4", group_size=4))], start=1):
        torch.manual_seed(seed)
        model.add_adapter(name, TABLE.config(lib, "llama", init_weights=False, **extra))
    return model.eval()


@pytest.mark.parametrize("names", [
    ["other", "__base__", "default", "default", "other"],  # one group size: gathered per row
    ["small", "other", "__base__", "default", "small"],  # two group sizes: adapter by adapter
    ["__base__"] * 5,
])
def test_mixed_batch_matches_hf_adapter_names(names):
    """HF PEFT honours adapter_names for RoAd: fastpeft's rows are bitwise HF PEFT's rows."""
    hf, fp = _with_adapters(peft), _with_adapters(fastpeft)
    ids = torch.randint(0, 100, (5, 6), generator=torch.Generator().manual_seed(3))
    expected = hf(input_ids=ids, adapter_names=names).logits
    assert torch.equal(fp(input_ids=ids, adapter_names=names).logits, expected)


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", init_weights=False)
    oh.assert_mixed_batch_rows(model, TABLE.inputs("mlp"), ["other", "__base__", "default"], close)


def test_mixed_batch_uses_one_gathered_pass():
    """Adapters of one group size and dtype: the layer never runs an adapter-by-adapter loop."""
    model = _with_adapters(fastpeft)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear)

    def refuse(*args, **kwargs):
        raise AssertionError("grouped path used")

    layer._grouped_forward = refuse
    model(input_ids=torch.ones(3, 4, dtype=torch.long), adapter_names=["other", "default", "__base__"])


def test_mixed_batch_trains_each_adapter_on_its_rows():
    """Training with adapter_names: each adapter's gradient comes from its own rows only."""
    model = oh.build_with_other(TABLE, fastpeft, "mlp", init_weights=False).train()
    x = TABLE.inputs("mlp")
    model(x, adapter_names=["other", "other", "__base__"]).pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or not g.any() for n, g in grads.items() if ".default" in n)
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if ".other" in n)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="road_3"), "variant"),
    (dict(group_size=0), "positive integer"),
    (dict(group_size=7), "even"),
    (dict(group_size=True), "positive integer"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoadConfig(**kwargs)


def test_group_size_that_does_not_fit_names_the_layer_and_leaves_the_model_untouched():
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"group_size=8 does not divide the output size 20 of layer 'lin1'"):
        fastpeft.get_peft_model(model, RoadConfig(group_size=8, target_modules=["lin1"]))
    with pytest.raises(ValueError, match="group_size=64 .* 'model.layers.0.self_attn.q_proj'"):
        fastpeft.get_peft_model(models.make_llama(), RoadConfig(task_type="CAUSAL_LM"))
    assert not any(isinstance(m, Linear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


def test_singular_rotation_refuses_unmerge_and_keeps_the_merge():
    """A zero scale makes a 2x2 block singular: HF PEFT's inverse would fail or blow up; fastpeft refuses
    before touching any weight."""
    model = TABLE.build(fastpeft, "mlp")
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.road_alpha["default"][0] = 0.0
    model.merge_adapter()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="Cannot unmerge RoAd adapter 'default' from layer 'lin1'.*singular"):
        model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, merged) and layer.merged


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("emb", ["emb"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear only."""
    with pytest.raises(ValueError, match="RoAd cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](),
                                RoadConfig(group_size=2, target_modules=targets))


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), RoadConfig(group_size=4))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    oh.assert_bf16_base_like_hf(TABLE, "mlp_random", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp"),
                                   autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_road4") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


def test_low_cpu_mem_usage_load_and_oversize_group_size_in_file(tmp_path):
    """Angles and scales built on the meta device get the file's values; a group size no model could hold is
    refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, "mlp_road4"), TABLE.inputs("mlp_road4")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    assert torch.equal(models.forward(loaded.eval(), x), models.forward(model, x))
    oh.rewrite_config(tmp_path, group_size=2 * 10**9)
    with pytest.raises(ValueError, match=r"RoadConfig.group_size=2000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


# ---------------------------------------------------------------------------- bitsandbytes 4 / 8-bit layers
QUANT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quant_config(lib, **extra):
    return lib.RoadConfig(target_modules=QUANT_TARGETS, group_size=16, init_weights=False, **extra)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    import quantised_models as qm

    return qm.save_llama(tmp_path_factory.mktemp("llama64"))


def _quantised_pair(folder, bits: int):
    """(fastpeft, HF PEFT) RoAd on the same quantised tiny Llama, HF's perturbed adapter copied into ours."""
    import quantised_models as qm

    torch.manual_seed(0)
    theirs = models.perturb(peft.get_peft_model(qm.load_quantised(folder, bits), _quant_config(peft)), 1, 0.1)
    ours = fastpeft.get_peft_model(qm.load_quantised(folder, bits), _quant_config(fastpeft))
    result = fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert not result.missing_keys and not result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_layers_train_run_and_save_like_hf(llama_folder, bits, tmp_path):
    """The training step first (bitsandbytes' CPU 4-bit kernel repacks weights on the first eval forward and
    has no backward), then logits, the disabled model and files both ways."""
    import quantised_models as qm
    from fastpeft.quant import bnb as qbnb

    ours, theirs = _quantised_pair(llama_folder, bits)
    assert {type(m).__name__ for m in ours.base_model.adapter_layers()} == {
        "Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert {qbnb.bnb_kind(m.get_base_layer()) for m in ours.base_model.adapter_layers()} == {f"{bits}bit"}
    _, grads = oh.assert_same_training_step(ours, theirs, qm.inputs(), close)
    assert any("road_theta" in n and g.abs().max() > 0 for n, g in grads.items())
    ours.eval(), theirs.eval()
    expected = qm.logits(theirs)
    with ours.disable_adapter():
        plain = qm.logits(ours)
    oh.assert_differs(expected, plain)
    close(qm.logits(ours), expected, "logits")
    oh.assert_files_both_ways(theirs, lambda: qm.load_quantised(llama_folder, bits), qm.inputs(), tmp_path,
                              close)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_merge_requantises_under_the_policy_and_unmerges_exactly(llama_folder, bits):
    import quantised_models as qm
    from fastpeft.errors import LossyMergeError

    ours, _ = _quantised_pair(llama_folder, bits)
    expected = qm.logits(ours)
    before = {id(m): m.get_base_layer().weight.data.clone() for m in ours.base_model.adapter_layers()}
    with pytest.raises(LossyMergeError, match="RoAd layer"):
        ours.base_model.merge_adapter(max_merge_error=0.0)
    assert not any(layer.merged for layer in ours.base_model.adapter_layers())
    ours.base_model.merge_adapter(allow_lossy_merge=True)
    merged = qm.logits(ours)
    with ours.disable_adapter():
        plain = qm.logits(ours)  # disabling unmerges
    assert (merged - expected).norm() < (0.5 if bits == 4 else 0.05) * (expected - plain).norm()
    assert all(torch.equal(m.get_base_layer().weight.data, before[id(m)])
               for m in ours.base_model.adapter_layers())
    close(qm.logits(ours), expected, "unmerged")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_merge_and_unload_dequantized_matches_hf_dense_merge(llama_folder, bits):
    """merge_and_unload(dequantize=True): dense layers holding HF PEFT's own dense merge of the dequantised
    weights."""
    import quantised_models as qm
    from fastpeft.quant import bnb as qbnb

    ours, theirs = _quantised_pair(llama_folder, bits)
    qm.logits(ours)  # bitsandbytes' CPU kernel repacks 4-bit weights on first use
    dense = qm.make_llama()
    names = [n for n, _ in ours.get_base_model().named_modules() if n.endswith(tuple(QUANT_TARGETS))]
    with torch.no_grad():
        for name in names:
            layer = ours.get_base_model().get_submodule(name).get_base_layer()
            dense.get_submodule(name).weight.copy_(qbnb.dequantize_weight(layer))
    hf_dense = peft.get_peft_model(dense, _quant_config(peft))
    peft.set_peft_model_state_dict(hf_dense, peft.get_peft_model_state_dict(theirs))
    expected = hf_dense.merge_and_unload()
    merged = ours.merge_and_unload(dequantize=True)
    for name in names:
        assert type(merged.get_submodule(name)) is torch.nn.Linear
        close(merged.get_submodule(name).weight, expected.get_submodule(name).weight, name)


def test_quantised_mixed_batch_rows(llama_folder):
    """Per-row adapter_names on 4-bit layers (HF PEFT's bitsandbytes RoAd layers hand the keyword to the base
    layer, which rejects it): each row is what its adapter alone gives."""
    import quantised_models as qm

    ours, _ = _quantised_pair(llama_folder, 4)
    torch.manual_seed(5)
    ours.add_adapter("other", _quant_config(fastpeft, variant="road_2"))
    ours.eval()
    batch = qm.inputs()
    names = ["other", "default"]
    mixed = qm.logits(ours, {**batch, "adapter_names": names})
    for i, name in enumerate(names):
        ours.set_adapter(name)
        close(mixed[i:i + 1], qm.logits(ours, {k: v[i:i + 1] for k, v in batch.items()}), f"row {i}")
