"""Super-Tuning (magnitude-chosen sparse weight entries trained, optionally a LoRA pair: Supra) against HF
PEFT: files both ways (indices stored or re-chosen on load), init, gradients and dropout, merging, several
adapters, mixed batches, bf16, bad sizes, low_cpu_mem_usage loads. (Rows supertuning-* of tests/cases.py also
run through the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.supertuning import SupertuningConfig, SupertuningLinear

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("supertuning-mlp"),
    "mlp_supra": table_row("supertuning-mlp-supra"),  # with dropout, the head too
    "mlp_random_supra": ("mlp", dict(target_modules=["lin0", "lin1"], sparsity=0.7, r=3, init_weights=False)),
    "mlp_bottom": table_row("supertuning-mlp-bottom"),
    "mlp_no_indices": ("mlp", dict(target_modules=["lin0", "lin1"], sparsity=0.95,
                                   save_precomputed_indices=False)),
    "llama": table_row("supertuning-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear_supra": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear",
                                             sparsity=0.98, r=2, lora_alpha=3)),
}
TABLE = oh.CaseTable(CASES, SupertuningConfig, peft.SupertuningConfig, scale=0.1, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_random_supra", "mlp_bottom", "llama_all_linear_supra"])
def test_init_matches_hf(case):
    """The same entries (indices bit for bit) and, from the same seed, the same values and LoRA factors; the
    default init changes nothing."""
    ours, theirs = TABLE.fresh(fastpeft, case), TABLE.fresh(peft, case)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours),
                              peft.get_peft_model_state_dict(theirs))
    x = TABLE.inputs(case)
    close(models.forward(ours, x), models.forward(theirs, x), "at init")
    if case in ("mlp", "mlp_bottom"):
        close(models.forward(ours, x), models.forward(TABLE.base(case), x), "identity at init")


def test_entries_are_chosen_by_magnitude():
    """select_top: the trained entries are the largest |W| (False: the smallest); int32 positions."""
    for case, largest in (("mlp", True), ("mlp_bottom", False)):
        layer = TABLE.fresh(fastpeft, case).base_model.model.lin1
        indices = layer.supertuning_indices["default"]
        assert indices.dtype == torch.int32 and indices.numel() == int(400 * (1 - layer_sparsity(case)))
        scores = layer.base_layer.weight.detach().abs().flatten()
        chosen, rest = scores[indices.long()], scores[~torch.isin(torch.arange(400), indices.long())]
        assert (chosen.min() >= rest.max()) if largest else (chosen.max() <= rest.min())


def layer_sparsity(case: str) -> float:
    return CASES[case][1]["sparsity"]


def test_indices_are_chosen_again_on_load_without_saved_indices(tmp_path):
    """save_precomputed_indices=False: neither library stores them; a load on the same base re-chooses the
    same entries."""
    theirs = TABLE.build(peft, "mlp_no_indices")
    theirs.save_pretrained(str(tmp_path))
    assert not any("indices" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp_no_indices"), str(tmp_path)).eval()
    x = TABLE.inputs("mlp_no_indices")
    close(models.forward(ours, x), models.forward(theirs, x), "re-chosen entries")
    assert "supertuning_indices" not in str(list(ours.state_dict()))


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_supra") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)
    assert ours.peft_config["default"].lora_alpha == 8
    assert SupertuningConfig(r=3).lora_alpha == 6 == peft.SupertuningConfig(r=3).lora_alpha


@pytest.mark.parametrize("case", ["mlp", "mlp_supra", "mlp_random_supra", "llama_all_linear_supra"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "supertuning_values")


def test_dropout_draws_like_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_supra")
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs("mlp_supra"), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", ["mlp", "mlp_supra", "mlp_bottom", "llama_all_linear_supra"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    """Both adapters' entries composed into the weight, both LoRA pairs added, as HF PEFT."""
    oh.assert_two_active_like_hf(TABLE, "mlp_supra", close, sparsity=0.5, r=1, lora_alpha=2,
                                 target_modules=["lin1"])


def test_two_adapters_switch_save_delete_like_hf(tmp_path):
    oh.assert_two_adapters_like_hf(TABLE, "mlp", dict(sparsity=0.6, target_modules=["lin1"]), tmp_path, close)


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp_supra", sparsity=0.5, r=1, target_modules=["lin0"])
    oh.assert_mixed_batch_rows(model, TABLE.inputs("mlp")[:3], ["other", "__base__", "default"], close)


def test_indices_stored_by_all_adapters_or_none():
    for lib in (fastpeft, peft):
        model = TABLE.build(lib, "mlp")
        with pytest.raises(ValueError, match="saved for all adapters"):
            model.add_adapter("other", TABLE.config(lib, "mlp", save_precomputed_indices=False))
        assert "other" not in model.peft_config


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), r"sparsity must be in \[0.0, 1.0\)"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(r=0), "r must be a positive integer"),
    (dict(r=True), "r must be a positive integer"),
    (dict(lora_alpha=4), "lora_alpha is set but r is None"),
    (dict(r=2, lora_dropout=1.0), "lora_dropout"),
])
def test_bad_config_is_refused_as_hf(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SupertuningConfig(**kwargs)
    if "sparsity" in kwargs or "lora_alpha" in kwargs:
        with pytest.raises(ValueError):
            peft.SupertuningConfig(**kwargs)


def test_sparsity_leaving_a_layer_nothing_is_refused_before_anything_is_built():
    """head (2 x 20 = 40 entries) at sparsity 0.99 keeps int(0.4) = 0 entries (HF PEFT refuses it too, once
    other layers are built)."""
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"SupertuningConfig.sparsity=0.99 leaves no trained entry in layer "
                                         r"'head' \(40 weight entries\)"):
        fastpeft.get_peft_model(model, SupertuningConfig(target_modules=["lin0", "lin1", "head"]))
    assert not any(isinstance(m, SupertuningLinear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)
    with pytest.raises(ValueError, match="leaves no trainable entries"):
        peft.get_peft_model(models.make_mlp(),
                            peft.SupertuningConfig(target_modules=["lin0", "lin1", "head"]))


@pytest.mark.parametrize("model_name,targets", [("conv1d_gpt2", ["c_fc"]), ("emb", ["emb"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear only (a TypeError there)."""
    with pytest.raises(ValueError, match="Super-Tuning cannot wrap module"):
        fastpeft.get_peft_model(models.MODELS[model_name][0](), SupertuningConfig(target_modules=targets))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """Value and LoRA dtypes (float32 with autocast_adapter_dtype, else the base's; indices int32), outputs
    and merged weights as HF PEFT; the files hold the same dtypes."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp_random_supra", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(TABLE.base("mlp").to(torch.bfloat16), TABLE.config(lib, "mlp_supra"),
                                   autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_low_cpu_mem_usage_load_and_oversize_r_in_file(tmp_path):
    """Values and LoRA factors built on the meta device get the file's values (the indices too); an r no model
    could hold is refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, "mlp_random_supra"), TABLE.inputs("mlp_random_supra")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"SupertuningConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


def test_meta_base_weight_is_refused():
    """The entries are chosen by the weight's magnitudes: a base without values cannot be adapted."""
    with torch.device("meta"):
        model = models.MLP()
    with pytest.raises(ValueError, match="Super-Tuning needs the values of the weight of 'lin0'"):
        fastpeft.get_peft_model(model, SupertuningConfig(target_modules=["lin0"]))


def test_hooks_on_a_base_layer_are_said_to_be_skipped(caplog):
    """As HF PEFT: the composed weight goes through F.linear, so base-layer hooks do not run (said once)."""
    base = models.make_mlp()
    calls = []
    base.lin0.register_forward_hook(lambda *_: calls.append(1))
    model = fastpeft.get_peft_model(base, SupertuningConfig(target_modules=["lin0", "lin1"], sparsity=0.9))
    with caplog.at_level("WARNING"):
        for _ in range(2):
            model(models.mlp_inputs())
    assert not calls
    assert caplog.text.count("hooks on its base layer do not run") == 1 and "'lin0'" in caplog.text
