"""Lily (low-rank interconnected adaptation across layers) against HF PEFT: files both ways, init, sharing of
A / B across layers, gradients, the refused merge, mixed batches, bad configs. (Rows lily-* of tests/cases.py
also run through the contract and oracle-matrix columns.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.lily import LilyConfig

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("lily-mlp"),
    "mlp_random": ("mlp", dict(r=5, num_B=3, scaling=0.5, target_modules=["lin0", "lin1"],
                               init_weights=False)),
    "llama": table_row("lily-llama"),  # default targets q_proj, v_proj; two layers share one A
    "llama_regex": ("llama", dict(task_type="CAUSAL_LM", r=4, num_B=3, stride_A=2,
                                  target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)")),
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")),
}
TABLE = oh.CaseTable(CASES, LilyConfig, peft.LilyConfig, scale=0.1)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "llama_regex"])
def test_fastpeft_made_file_loads_in_hf(case, tmp_path):
    oh.assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", list(CASES))
def test_init_matches_hf(case, tmp_path):
    """The same RNG state -> the same A, router and B (zero B with init_weights=True: identity at start)."""
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case)),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))
    identity = CASES[case][1].get("init_weights", True)
    oh.assert_init_like_hf(TABLE, case, tmp_path / case, close, identity=identity)


def _sharing(model) -> list[list[str]]:
    """Names of the adapter modules, grouped by object identity (which layers share an A / B)."""
    groups: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name.endswith(("lily_A.default", "lily_B.default")):
            groups.setdefault(id(module), []).append(name)
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("case", ["llama", "llama_regex", "mlp"])
def test_layers_share_a_and_b_like_hf(case):
    ours, theirs = TABLE.fresh(fastpeft, case), TABLE.fresh(peft, case)
    assert _sharing(ours) == _sharing(theirs)
    if case == "llama":  # both q_proj share one A (stride_A=2) and one B
        groups = _sharing(ours)
        assert ["base_model.model.model.layers.0.self_attn.q_proj.lily_A.default",
                "base_model.model.model.layers.1.self_attn.q_proj.lily_A.default"] in groups


@pytest.mark.parametrize("case", ["mlp_random", "llama", "llama_regex"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "lily_")


def test_one_sgd_step_matches_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "llama")
    oh.assert_same_training_step(fp, hf, TABLE.inputs("llama"), close)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_two_adapters_match_hf_for_every_active_set(case):
    other = dict(r=3, num_B=4, init_weights=False, stride_A=1)
    theirs, ours = (oh.build_with_other(TABLE, lib, case, **other) for lib in (peft, fastpeft))
    x = TABLE.inputs(case)
    with theirs.disable_adapter(), ours.disable_adapter():
        close(models.forward(ours, x), models.forward(theirs, x), "disabled")
    for active in (["default", "other"], "other", "default"):
        theirs.base_model.set_adapter(active)
        ours.base_model.set_adapter(active)
        close(models.forward(ours, x), models.forward(theirs, x), f"active={active}")


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload", "layer_merge"])
def test_merge_is_refused_and_weights_untouched(call):
    model, x = TABLE.build(fastpeft, "llama"), TABLE.inputs("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = models.forward(model, x)
    with pytest.raises(NotImplementedError, match="Lily adapters cannot be merged.*router"):
        if call == "layer_merge":
            model.base_model.model.model.layers[0].self_attn.q_proj.merge()
        else:
            getattr(model, call)()
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    close(models.forward(model, x), expected, "after the refused merge")


def test_unload_gives_the_base_model_back():
    model, x = TABLE.build(fastpeft, "mlp"), TABLE.inputs("mlp")
    plain = model.unload()
    close(models.forward(plain, x), models.forward(TABLE.base("mlp"), x), "unloaded")


def test_mixed_batch_runs_each_adapters_rows_as_their_own_batch():
    """The router averages over the batch, so a mixed batch runs each adapter's rows as one batch of their
    own: the rows of 'other' equal a forward of just those rows with 'other' active."""
    model = TABLE.build(fastpeft, "mlp")
    model.add_adapter("other", TABLE.config(fastpeft, "mlp_random"))
    models.perturb(model, 4, 0.1)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))
    names = ["default", "other", "other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for name, rows in (("default", [0, 4]), ("other", [1, 2])):
            model.set_adapter(name)
            close(mixed[rows], model(x[rows]), name)
        with model.disable_adapter():
            close(mixed[[3]], model(x[[3]]), "__base__")


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(stride_A=0), "stride_A"),
    (dict(num_B=1), "num_B"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LilyConfig(**kwargs)


def test_unsupported_layer_is_refused_and_model_untouched():
    model = models.MODELS["conv2d"][0]()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="Lily cannot wrap module 'conv0'"):
        fastpeft.get_peft_model(model, LilyConfig(r=2, target_modules=["conv0"]))
    assert [type(m) for m in model.modules()] == before


def test_added_adapter_is_unshared_like_hf():
    """HF PEFT shares A / B only for the adapter the model is created with; an added one keeps its own."""
    other = dict(r=3, num_B=4, init_weights=False)
    theirs, ours = (oh.build_with_other(TABLE, lib, "llama", **other) for lib in (peft, fastpeft))
    assert _sharing(ours) == _sharing(theirs)


def test_file_with_per_layer_tensors_keeps_them(tmp_path):
    """A file whose layers hold different A / B (HF PEFT's added adapter) loads as saved: the layers this
    model would share get their own copies, so the outputs are those of the model that saved it."""
    theirs = oh.build_with_other(TABLE, peft, "llama", init_weights=False)
    theirs.base_model.set_adapter("other")
    x = TABLE.inputs("llama")
    expected = models.forward(theirs, x)
    theirs.save_pretrained(str(tmp_path), selected_adapters=["other"])
    loaded = fastpeft.PeftModel.from_pretrained(TABLE.base("llama"), str(tmp_path / "other")).eval()
    close(models.forward(loaded, x), expected, "per-layer file")


@pytest.mark.parametrize("field", ["r", "num_B"])
def test_low_cpu_mem_usage_load_and_oversize_sizes_in_file(field, tmp_path):
    """Shared A / B built on the meta device get the file's values; an r or num_B no model could hold is
    refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, "llama"), TABLE.inputs("llama")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(TABLE.base("llama"), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    assert _sharing(loaded) == _sharing(model)
    oh.rewrite_config(tmp_path, **{field: 10**9})
    with pytest.raises(ValueError, match=rf"LilyConfig.{field}=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(TABLE.base("llama"), str(tmp_path))
