"""PEANuT against HF PEFT 0.21.2: seeded init, files both ways (nested encoder / decoder keys), outputs,
gradients, merging from the pre-merge weight, several adapters, mixed batches, bf16, refusals. (Rows peanut-*
of tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.peanut import PeanutConfig, PeanutLinear

import models
import oracle_helpers as oh

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": ("mlp", dict(r=4, target_modules=["lin0", "lin1"])),
    "mlp_deep": ("mlp", dict(r=3, depth=2, act_fn="gelu", scaling=0.5, init_weights=False,
                             target_modules=["lin0", "lin1", "head"])),
    "mlp_exclude": ("mlp", dict(r=2, depth=1, act_fn="tanh", target_modules="all-linear",
                                exclude_modules=["lin0"])),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4, depth=1)),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")),
}
TABLE = oh.CaseTable(CASES, PeanutConfig, peft.PeanutConfig, scale=0.3, init_seed=5)


def close(a, b, what="", atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_init_matches_hf(case, tmp_path):
    """The same seed draws the same A / encoders / decoders / B (HF PEFT builds nn.Linear modules, then
    redraws them); init_weights=True starts at the base model."""
    torch.manual_seed(5)
    oh.assert_init_like_hf(TABLE, case, tmp_path, close, identity=CASES[case][1].get("init_weights", True))
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case)),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF's adapter through fastpeft and back (same keys -- `peanut_encoders.0.weight` without the adapter
    name --, tensors, config JSON, outputs); fastpeft's adapter in HF PEFT."""
    oh.assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_deep", "llama"])
def test_training_step_matches_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_same_training_step(fp, hf, TABLE.inputs(case), lambda a, b, w: close(a, b, w, atol=1e-4))
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), lambda a, b, w: close(a, b, w, atol=1e-4),
                                "peanut_encoders" if CASES[case][1].get("depth") else "peanut_A")


def test_update_is_the_weight_network():
    """dW = scaling * (B(f(dec(f(enc(h))) + h)))^T with h = f(W^T A^T), written out for depth 1 (no HF)."""
    model = TABLE.build(fastpeft, "mlp_exclude")
    layer = model.base_model.model.lin1
    w, act = layer.base_layer.weight, torch.tanh
    h = act(w.t() @ layer.peanut_A["default"].weight.t())
    inner = act(h @ layer.peanut_encoders["default"][0].weight.t())
    h = act(inner @ layer.peanut_decoders["default"][0].weight.t()) + h
    want = (h @ layer.peanut_B["default"].weight.t()).t()
    close(layer.delta_weight("default"), want, "dW")
    x = torch.randn(3, 20)
    close(layer.adapter_output("default", x), x @ want.t(), "forward")


@pytest.mark.parametrize("case", ["mlp", "mlp_deep", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    """Two active adapters: both updates from the pre-merge weight, as HF PEFT; unmerging puts it back bit
    for bit; merge_and_unload gives HF PEFT's modules and outputs."""
    ours, theirs = (oh.build_with_other(TABLE, lib, case, depth=1, act_fn="silu", scaling=2.0)
                    for lib in (fastpeft, peft))
    oh.assert_adapters_merge_like_hf(ours, theirs, TABLE.inputs(case), close, exact_unmerge=True)


def test_merges_in_two_calls_use_the_original_weight_like_hf():
    """'default' merged, then 'other' merged in a second call: the second update is still computed from the
    weight before any merge (HF PEFT keeps that weight), not from the merged one."""
    ours, theirs = (oh.build_with_other(TABLE, lib, "mlp_deep", depth=0) for lib in (fastpeft, peft))
    before = ours.base_model.model.lin1.base_layer.weight.detach().clone()
    for model in (ours, theirs):
        model.base_model.merge_adapter(["default"])
        model.base_model.merge_adapter(["other"])
    for name in ("lin0", "lin1", "head"):
        close(getattr(ours.base_model.model, name).base_layer.weight,
              getattr(theirs.base_model.model, name).base_layer.weight, f"merged {name}")
    layer = ours.base_model.model.lin1
    assert layer.merged_adapters == ["default", "other"]
    ours.base_model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, before)
    assert layer._weight_before_merge is None


def test_adapter_switching_delete_and_mixed_batch_match_hf():
    ours, theirs = (oh.build_with_other(TABLE, lib, "llama", r=2, depth=0) for lib in (fastpeft, peft))
    x = TABLE.inputs("llama")
    oh.assert_adapter_switching_like_hf(ours, theirs, x, models.forward(TABLE.base("llama"), x), close)


def test_mixed_batch_rows_use_their_own_adapter_and_refuse_when_merged():
    model = oh.build_with_other(TABLE, fastpeft, "mlp_deep", depth=1)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    oh.assert_mixed_batch_rows(model, x, ["other", "default", "__base__", "other"], close)
    model.base_model.set_adapter(["default", "other"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(x, adapter_names=["other", "default", "__base__", "other"])


def test_bf16_base_like_hf():
    oh.assert_bf16_base_like_hf(TABLE, "mlp_deep")


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(depth=-1), "depth must be a non-negative integer"),
    (dict(act_fn="nope"), "act_fn='nope' is not an activation"),
    (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
    (dict(target_modules=".*lin0", layers_to_transform=[0]), "layers_to_transform cannot be used"),
])
def test_bad_config_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeanutConfig(**kwargs)


@pytest.mark.parametrize("make, target", [(models.make_conv1d_gpt2, "c_fc"), (models.make_emb, "emb"),
                                          (models.make_conv2d, "conv0")])
def test_layer_types_hf_cannot_adapt_are_refused_untouched(make, target):
    """HF PEANuT adapts nn.Linear only (it raises NotImplementedError for the rest): refused by name, the
    model left as it was."""
    base = make()
    with pytest.raises(ValueError, match=f"PEANuT cannot wrap module '{target}'"):
        fastpeft.get_peft_model(base, PeanutConfig(r=2, target_modules=[target]))
    assert not any(isinstance(m, PeanutLinear) for m in base.modules())


def test_gpt2_all_linear_is_refused_naming_a_conv1d():
    """'all-linear' lists GPT-2's Conv1D projections as HF PEFT does; PEANuT cannot adapt them."""
    with pytest.raises(ValueError, match="PEANuT cannot wrap module .* of type Conv1D"):
        fastpeft.get_peft_model(models.make_gpt2(), PeanutConfig(r=2, target_modules="all-linear"))
