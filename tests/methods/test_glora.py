"""GLoRA (generalised LoRA) against HF PEFT: files both ways (with the `zeros` buffers of unused supports),
init, gradients, merges of one and several adapters, partial unmerge, mixed batches, bad configs and layers.
(Rows glora-* of tests/cases.py also run through the contract and oracle-matrix columns.)"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.glora import GloraConfig

import models
import oracle_helpers as oh
from cases import table_row

MLP = ["lin0", "lin1"]
CASES = {
    "mlp": table_row("glora-mlp"),
    "mlp_vectors_bias_only": table_row("glora-mlp-vectors-bias-only"),
    "mlp_random": ("mlp", dict(r=3, target_modules=MLP, init_weights=False)),
    "mlp_constant": ("mlp", dict(target_modules=MLP, config_A_B="constant", config_C="none",
                                 config_D_E="none", init_weights=False)),
    "mlp_none_vectors": ("mlp", dict(target_modules=MLP + ["head"], config_A_B="none", config_C="vector",
                                     config_D_E="vector", init_weights=False)),
    "mlp_bias_all": ("mlp", dict(r=2, target_modules=["lin1"], bias="all")),
    "llama": table_row("glora-llama"),  # default targets q_proj, v_proj; no biases: C, D, E are zeros
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear",
                                       config_A_B="vector")),
}
TABLE = oh.CaseTable(CASES, GloraConfig, peft.GloraConfig, scale=0.1)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "mlp_none_vectors", "llama"])
def test_fastpeft_made_file_loads_in_hf(case, tmp_path):
    oh.assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", list(CASES))
def test_init_matches_hf(case, tmp_path):
    """The same RNG state -> the same tensors (zero Xd / vectors / scalars with init_weights=True)."""
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(TABLE.fresh(fastpeft, case)),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case)))
    identity = CASES[case][1].get("init_weights", True)
    oh.assert_init_like_hf(TABLE, case, tmp_path / case, close, identity=identity)


@pytest.mark.parametrize("case", ["mlp_random", "mlp_constant", "mlp_none_vectors", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "glora_")


@pytest.mark.parametrize("case", ["mlp", "mlp_random", "mlp_none_vectors", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_two_adapters_merge_against_the_original_weight_like_hf(case):
    """Both adapters' changes are computed from W0 (not one on top of the other), merged or not. (Unmerging
    divides by 1 + sum A: 'vector' A drawn in U(-1, 1) can bring it near 0, where no unmerge is exact.)"""
    oh.assert_two_active_like_hf(TABLE, case, close, config_D_E="vector", init_weights=False)


def test_merging_one_adapter_after_another_and_partial_unmerge_match_hf():
    theirs, ours = (oh.build_with_other(TABLE, lib, "mlp", init_weights=False) for lib in (peft, fastpeft))
    x = TABLE.inputs("mlp")
    for model in (theirs, ours):
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
    close(models.forward(ours, x), models.forward(theirs, x), "merged one after the other")
    for model in (theirs, ours):
        for module in model.modules():
            if type(module).__name__ in ("GloraLinear",):
                module.unmerge(["default"])
        assert all(m.merged_adapters == ["other"] for m in model.modules() if hasattr(m, "glora_A"))
    close(models.forward(ours, x), models.forward(theirs, x), "'default' unmerged")
    for name, param in ours.named_parameters():
        if "base_layer" in name:
            close(param, theirs.get_parameter(name), name)


def test_mixed_batch_matches_hf():
    """HF PEFT serves adapter_names for GLoRA: each row with its own adapter ('__base__': none)."""
    theirs, ours = (oh.build_with_other(TABLE, lib, "mlp", init_weights=False) for lib in (peft, fastpeft))
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        close(ours(x, adapter_names=names), theirs(x, adapter_names=names), "mixed batch")
    oh.assert_mixed_batch_rows(ours, x, names, close)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(config_A_B="diag"), "config_A_B"),
    (dict(config_C="constant"), "config_C"),
    (dict(config_D_E="lora"), "config_D_E"),
    (dict(bias="some"), "bias"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GloraConfig(**kwargs)


class LinearSubclass(nn.Linear):
    pass


@pytest.mark.parametrize("model_name,target", [("conv1d_gpt2", "c_fc"), ("conv2d", "conv0"), ("sub", "lin1")])
def test_unsupported_layer_is_refused_and_model_untouched(model_name, target):
    """HF PEFT adapts plain nn.Linear only (no Conv1D, no subclasses)."""
    if model_name == "sub":
        model = models.MODELS["mlp"][0]()
        model.lin1 = LinearSubclass(20, 20)
    else:
        model = models.MODELS[model_name][0]()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=f"GLoRA cannot wrap module '{target}'"):
        fastpeft.get_peft_model(model, GloraConfig(r=2, target_modules=[target]))
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("case", ["mlp_none_vectors", "llama"])
def test_low_cpu_mem_usage_load_and_oversize_r_in_file(case, tmp_path):
    """Supports built on the meta device get the file's values (the zeros buffers too); an r no model could
    hold is refused from the config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, case), TABLE.inputs(case)
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"GloraConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path))
