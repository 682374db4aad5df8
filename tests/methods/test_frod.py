"""FRoD (shared per-role basis V, per-layer U / lambda, sparse trained S) against HF PEFT: the bases, S
positions and init bit-identical, files both ways (bases in the file or rebuilt), gradients, dropout, merging
(exact unmerge), several adapters, mixed batches, bf16, low_cpu_mem_usage, errors. (Rows frod-* of
tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import json

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.frod import FrodConfig, FrodLinear
from fastpeft.methods.frod.model import sparse_positions

import models
import oracle_helpers as oh
from cases import table_row

QUIET = {"progressbar": False}
CASES = {
    "mlp": table_row("frod-mlp"),
    "mlp_random": ("mlp", dict(target_modules=["lin0", "lin1"], init_weights=False, sparse_rate=0.2,
                               **QUIET)),
    "mlp_dropout": ("mlp", dict(target_modules=["lin0", "lin1"], frod_dropout=0.3, sparse_rate=0.1, **QUIET)),
    "mlp_bias_only": table_row("frod-mlp-bias-only"),
    "mlp_bias_all": ("mlp", dict(target_modules=["lin0"], bias="all", **QUIET)),
    "mlp_dense_s": ("mlp", dict(target_modules=["lin0", "lin1"], sparse_rate=1.0, projection_prng_key=3,
                                **QUIET)),
    "mlp_no_s": ("mlp", dict(target_modules=["lin1"], sparse_rate=0.0, **QUIET)),
    "mlp_no_projection": ("mlp", dict(target_modules=["lin0", "lin1"], save_projection=False, sparse_rate=0.1,
                                      **QUIET)),
    "gpt2": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], sparse_rate=0.05, **QUIET)),
    "llama": table_row("frod-llama"),  # default targets: q_proj, v_proj (one basis per role, 2 blocks)
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", sparse_rate=0.02,
                                       **QUIET)),
}
TABLE = oh.CaseTable(CASES, FrodConfig, peft.FrodConfig, scale=0.1, init_seed=0)
STORES = ("frod_V", "frod_s_indices", "frod_s_size")


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


# sparse_rate=0 leaves S with no entry: its (0,)-shaped values look like a ZeRO-3 placeholder to the saver
@pytest.mark.parametrize("case", [c for c in CASES if c != "mlp_no_s"])
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_random", "mlp_dense_s", "mlp_no_s", "gpt2", "llama",
                                  "llama_all_linear"])
def test_init_matches_hf(case, tmp_path):
    """Same bases V, S positions, lambda, (random) S values and the frozen U as HF PEFT, bit for bit; the
    default init reproduces the base model (to rounding: W = U diag(lambda) V^T is solved, not copied)."""
    ours, theirs = TABLE.fresh(fastpeft, case), TABLE.fresh(peft, case)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours),
                              peft.get_peft_model_state_dict(theirs))
    for role in theirs.base_model.frod_V:
        for attr in STORES:
            assert torch.equal(getattr(ours.base_model, attr)[role]["default"],
                               getattr(theirs.base_model, attr)[role]["default"]), (attr, role)
    hf_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "frod_U")}
    for name, module in ours.named_modules():
        if isinstance(module, FrodLinear):
            assert torch.equal(module.frod_U["default"], hf_layers[name].frod_U["default"]), name
    x = TABLE.inputs(case)
    close(models.forward(ours.eval(), x), models.forward(theirs.eval(), x), "at init")
    if case != "mlp_random":
        close(models.forward(ours, x), models.forward(TABLE.base(case), x), "identity at init")


def test_sparse_positions_are_off_diagonal_and_distinct():
    idx = sparse_positions(7, 0.5, torch.Generator().manual_seed(0))
    assert idx.shape == (2, int(49 * 0.5))
    assert not (idx[0] == idx[1]).any()
    assert len({(int(r), int(c)) for r, c in idx.T}) == idx.shape[1]
    assert sparse_positions(1, 1.0, torch.Generator()).shape == (2, 0)  # no off-diagonal position at all
    assert sparse_positions(5, 0.001, torch.Generator()).shape == (2, 1)  # a rate > 0 keeps one entry


@pytest.mark.parametrize("case", ["mlp", "mlp_random", "mlp_bias_only", "gpt2", "llama"])
def test_training_step_gradients_match_hf(case):
    theirs, ours = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(ours, theirs, TABLE.inputs(case), close, "frod_")


def test_dropout_draws_like_hf():
    """Dropout on: base(x) + W'h - Wh with the same masks as HF PEFT; merging ignores dropout."""
    theirs, ours = oh.same_adapter_pair(TABLE, "mlp_dropout")
    x = TABLE.inputs("mlp_dropout")
    oh.assert_dropout_draws_like_hf(ours, theirs, x, close, seeds=(0, 1, 2))
    oh.assert_dropout_never_merged(ours, theirs, x, close, ["lin0", "lin1"])


@pytest.mark.parametrize("case", ["mlp", "mlp_bias_only", "gpt2", "llama"])
def test_merge_unmerge_like_hf(case):
    """merge_adapter keeps the outputs; unmerge puts back the weight saved before the merge bit for bit."""
    theirs, ours = oh.same_adapter_pair(TABLE, case)
    x = TABLE.inputs(case)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    close(models.forward(ours, x), models.forward(theirs, x), "merged vs HF unmerged")
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    oh.assert_merge_cycle_like_hf(ours, theirs, x, close)


def test_two_adapters_like_hf(tmp_path):
    oh.assert_two_adapters_like_hf(TABLE, "mlp", {"init_weights": False}, tmp_path, close)


def test_second_adapter_shares_first_bases_like_hf(caplog):
    """A second adapter on the same roles shares the first one's bases and S positions, as HF PEFT: its own
    sparse_rate is not used (logged). (HF PEFT then cannot load that adapter's file alone: its S has the first
    adapter's size.)"""
    built = {}
    for lib in (fastpeft, peft):
        model = TABLE.fresh(lib, "mlp")
        torch.manual_seed(3)
        with caplog.at_level("WARNING"):
            model.add_adapter("other", TABLE.config(lib, "mlp", sparse_rate=0.3, init_weights=False))
        built[lib] = model
    assert "sparse_rate" in caplog.text
    ours, theirs = built[fastpeft], built[peft]
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours, adapter_name="other"),
                              peft.get_peft_model_state_dict(theirs, adapter_name="other"))
    positions = ours.base_model.frod_s_indices["lin1"]
    assert positions["other"] is positions["default"]


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_two_active_adapters_merge_like_hf(case):
    """Both active: base(x) + sum_i (W'_i x - W x); merged deltas all start from the weight before the first
    merge, and unmerge restores it exactly."""
    oh.assert_two_active_like_hf(TABLE, case, close, sparse_rate=0.2)
    theirs, ours = (oh.build_with_other(TABLE, lib, case, sparse_rate=0.2) for lib in (peft, fastpeft))
    oh.assert_adapters_merge_like_hf(ours, theirs, TABLE.inputs(case), close, exact_unmerge=True)


def test_mixed_batch_rows():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", sparse_rate=0.2)
    x = TABLE.inputs("mlp")
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_mixed_batch_on_llama_like_hf():
    ours, theirs = (oh.build_with_other(TABLE, lib, "llama", sparse_rate=0.2) for lib in (fastpeft, peft))
    base_outputs = models.forward(TABLE.base("llama"), TABLE.inputs("llama"))
    oh.assert_adapter_switching_like_hf(ours, theirs, TABLE.inputs("llama"), base_outputs, close)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_like_hf(autocast):
    oh.assert_bf16_base_like_hf(TABLE, "mlp", autocast_adapter_dtype=autocast)


def test_file_bases_win_over_rebuilt_ones(tmp_path):
    """save_projection=True: V comes from the file (scaled here in HF's model before saving)."""
    theirs, x = TABLE.build(peft, "mlp"), TABLE.inputs("mlp")
    with torch.no_grad():
        theirs.base_model.frod_V["lin1"]["default"].mul_(1.5)
    expected = models.forward(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path)).eval()
    close(models.forward(ours, x), expected, "V from the file")


def test_missing_bases_refused(tmp_path):
    """save_projection=False files hold no bases; told they do, the load is refused with the way out."""
    TABLE.build(peft, "mlp_no_projection").save_pretrained(str(tmp_path))
    oh.rewrite_config(tmp_path, save_projection=True)
    with pytest.raises(ValueError, match="save_projection"):
        fastpeft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path))


def test_low_cpu_mem_usage_load(tmp_path):
    theirs, x = TABLE.build(peft, "llama"), TABLE.inputs("llama")
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base("llama"), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in ours.parameters())
    close(models.forward(ours.eval(), x), models.forward(theirs, x), "low_cpu_mem_usage")


def test_config_json_like_hf(tmp_path):
    kwargs = dict(target_modules=["lin0"], sparse_rate=0.3, regularization_alpha=0.01, frod_dropout=0.1,
                  projection_prng_key=4, init_weights=False, **QUIET)
    oh.assert_same_config_json(FrodConfig(**kwargs), peft.FrodConfig(**kwargs), tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparse_rate=1.5), "sparse_rate"),
    (dict(sparse_rate=-0.1), "sparse_rate"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
    (dict(bias="some"), "bias"),
    (dict(frod_dropout=2.0), "frod_dropout"),
])
def test_bad_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrodConfig(**kwargs)
    if match in ("sparse_rate", "layers_to_transform"):  # HF PEFT refuses these too
        with pytest.raises(ValueError):
            peft.FrodConfig(**kwargs)


def test_unsupported_layer_and_offload_refused():
    with pytest.raises((TypeError, ValueError), match="FRoD|frod"):
        fastpeft.get_peft_model(models.make_emb(), FrodConfig(target_modules=["emb"], **QUIET))
    with pytest.raises(ValueError, match="runtime_offload_base_weight"):
        fastpeft.get_peft_model(models.make_mlp(), FrodConfig(target_modules=["lin0"],
                                                               runtime_offload_base_weight=True, **QUIET))


def test_second_adapter_must_share_seed_and_saving():
    model = TABLE.fresh(fastpeft, "mlp")
    other_key = FrodConfig(target_modules=["lin0"], projection_prng_key=1, **QUIET)
    oh.assert_add_adapter_refused(model, "second", other_key, "projection_prng_key")
    unsaved = FrodConfig(target_modules=["lin0"], save_projection=False, **QUIET)
    oh.assert_add_adapter_refused(model, "third", unsaved, "save_projection")
    assert not any(".second" in k or ".third" in k for k in model.base_model.state_dict())


def test_file_bases_of_other_shape_refused(tmp_path):
    """A file whose V does not fit the targets is refused before anything is written."""
    TABLE.build(peft, "mlp").save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.frod_V.lin1"] = torch.zeros(5, 5)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="frod_V.lin1"):
        fastpeft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path))


def test_oversize_values_in_config_file_refused(tmp_path):
    """A value that cannot be FRoD's (a rate above 1) in adapter_config.json: refused on load, nothing
    built."""
    TABLE.build(peft, "mlp").save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["sparse_rate"] = 2**30
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = TABLE.base("mlp")
    with pytest.raises(ValueError, match="sparse_rate"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path))
    assert not any("frod" in n for n, _ in base.named_modules())


def test_float32_file_on_bf16_base_solves_u_for_the_loaded_basis(tmp_path):
    """V decomposed from float32 weights, loaded onto a bfloat16 base whose own decomposition differs: U is
    solved again for the loaded V, so the outputs stay those of the float32 adapter (HF PEFT keeps the U of
    its rebuilt V and is off by more than the adapter's effect)."""
    ours32, x = TABLE.build(fastpeft, "mlp"), TABLE.inputs("mlp")
    expected = models.forward(ours32, x)
    effect = (expected - models.forward(TABLE.base("mlp"), x)).abs().max().item()
    ours32.save_pretrained(str(tmp_path))
    base16 = TABLE.base("mlp").to(torch.bfloat16)
    ours16 = fastpeft.PeftModel.from_pretrained(base16, str(tmp_path)).eval()
    out = models.forward(ours16, x.to(torch.bfloat16)).float()
    assert (out - expected).abs().max().item() < effect / 4
    theirs16 = peft.PeftModel.from_pretrained(TABLE.base("mlp").to(torch.bfloat16), str(tmp_path)).eval()
    assert (models.forward(theirs16, x.to(torch.bfloat16)).float() - expected).abs().max().item() > effect / 2
