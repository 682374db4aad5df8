"""Uni-LoRA (every layer's factors read from one trained vector theta_d through seeded indices) against HF
PEFT 0.21.2: files both ways with and without saved indices, seeded init, gradients, dropout, merging, several
adapters, mixed batches, bf16, low_cpu_mem_usage, errors. (Rows unilora-* of tests/cases.py also run through
the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.unilora import UniLoraConfig, UniLoraLinear
from fastpeft.methods.unilora.model import balanced_indices

import models
import oracle_helpers as oh
from cases import table_row

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": table_row("unilora-mlp"),
    "mlp_save_indices": ("mlp", dict(r=3, target_modules=["lin0", "lin1"], theta_d_length=50,
                                     save_indices=True, proj_seed=3)),
    "mlp_dropout": ("mlp", dict(r=2, target_modules=["lin0", "lin1"], unilora_dropout=0.3)),
    "mlp_bias_only": table_row("unilora-mlp-bias-only"),
    "mlp_bias_all": ("mlp", dict(r=2, target_modules=["lin0"], bias="all", init_weights=False)),
    "gpt2_conv1d": table_row("unilora-gpt2-conv1d"),
    "llama": table_row("unilora-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear",
                                       theta_d_length=64)),
}
TABLE = oh.CaseTable(CASES, UniLoraConfig, peft.UniLoraConfig, scale=0.3, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(bias cases: the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


def test_file_keys(tmp_path):
    """theta_d once under the tuner's key; indices and scales per layer only with save_indices."""
    for case in ("mlp", "mlp_save_indices"):
        TABLE.build(fastpeft, case).save_pretrained(str(tmp_path / case))
    assert sorted(load_file(str(tmp_path / "mlp" / "adapter_model.safetensors"))) == [
        "base_model.unilora_theta_d"]
    keys = load_file(str(tmp_path / "mlp_save_indices" / "adapter_model.safetensors"))
    assert keys["base_model.model.lin0.unilora_indices_A"].dtype == torch.int64
    assert len(keys) == 9


@pytest.mark.parametrize("case", ["mlp", "mlp_save_indices", "gpt2_conv1d", "llama", "llama_all_linear"])
def test_init_matches_hf(case):
    """The same global RNG state -> the same theta_d, indices and scales (the whole state dict), the same
    trainable names, and the RNG left where HF PEFT leaves it."""
    ours = TABLE.fresh(fastpeft, case)
    after_ours = torch.rand(3)
    theirs = TABLE.fresh(peft, case)
    after_theirs = torch.rand(3)
    oh.assert_same_state_dict(ours.state_dict(), theirs.state_dict())
    buffers = dict(theirs.named_buffers())
    for name, buf in ours.named_buffers():
        assert torch.equal(buf, buffers[name]), name
    assert ([n for n, p in ours.named_parameters() if p.requires_grad]
            == [n for n, p in theirs.named_parameters() if p.requires_grad])
    assert torch.equal(after_ours, after_theirs)


def test_every_layer_reads_the_one_vector():
    model = TABLE.build(fastpeft, "llama_all_linear")
    theta = model.base_model.unilora_theta_d["default"]
    layers = [m for m in model.modules() if isinstance(m, UniLoraLinear)]
    assert len(layers) > 2 and all(m.unilora_theta_d["default"] is theta for m in layers)
    assert model.get_nb_trainable_parameters()[0] == 64


@pytest.mark.parametrize("count,length", [(10, 4), (12, 4), (3, 8), (1000, 7)])
def test_assignment_is_balanced(count, length):
    """Each theta_d entry used floor(D/d) or ceil(D/d) times (the paper's balanced assignment)."""
    counts = torch.bincount(balanced_indices(count, length, 42), minlength=length)
    assert counts.sum() == count and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("case", ["mlp", "mlp_bias_only", "gpt2_conv1d", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "unilora_")


def test_dropout_draws_like_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_dropout")
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs("mlp_dropout"), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", ["mlp", "mlp_dropout", "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, r=3, theta_d_length=20, target_modules=["lin1"])


def test_second_adapter_files_match_hf(tmp_path):
    """A second adapter has its own theta_d and assignment; its folder holds HF PEFT's keys and values."""
    theirs, ours = (oh.build_with_other(TABLE, lib, "mlp", r=3, theta_d_length=20, save_indices=True,
                                        target_modules=["lin1"]) for lib in (peft, fastpeft))
    for lib, model in (("hf", theirs), ("ours", ours)):
        model.save_pretrained(str(tmp_path / lib), selected_adapters=["other"])
    oh.assert_same_files(tmp_path / "ours" / "other", tmp_path / "hf" / "other")


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, theta_d_length=20, target_modules=["lin0"])
    x = TABLE.inputs("mlp")[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_delete_adapter_drops_its_vector_and_indices():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", r=3, theta_d_length=20)
    model.delete_adapter("other")
    assert "other" not in model.base_model.unilora_theta_d
    assert not any(".other" in k for k in model.state_dict())
    assert not any(".other" in k for k, _ in model.named_buffers())


def test_saved_indices_are_loaded_not_rebuilt(tmp_path):
    """With save_indices the file's indices and scales are used as they are (here: not what proj_seed
    gives)."""
    theirs, x = TABLE.build(peft, "mlp_save_indices"), TABLE.inputs("mlp_save_indices")
    layer = theirs.base_model.model.lin1
    with torch.no_grad():
        layer.unilora_indices_A["default"].copy_(layer.unilora_indices_A["default"].flip(1))
        layer.unilora_scales_B["default"].mul_(2)
    expected = models.forward(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp_save_indices"), str(tmp_path)).eval()
    close(models.forward(ours, x), expected, "indices from the file")


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(theta_d_length=0), "theta_d_length must be a positive integer"),
    (dict(unilora_dropout=1.5), "unilora_dropout"),
    (dict(init_theta_d_bound=0.0), "init_theta_d_bound"),
    (dict(bias="lora_only"), "bias"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=".*lin.*", layers_pattern="layers"), "layers_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniLoraConfig(**kwargs)


@pytest.mark.parametrize("model_name,targets", [("emb", ["emb"]), ("conv2d", ["conv0"])])
def test_layers_other_than_linear_are_refused(model_name, targets):
    """HF PEFT 0.21 adapts nn.Linear and Conv1D only (a TypeError there); the model is left untouched."""
    model = models.MODELS[model_name][0]()
    with pytest.raises(ValueError, match="UniLoRA cannot wrap module"):
        fastpeft.get_peft_model(model, UniLoraConfig(r=2, target_modules=targets))
    assert not any(isinstance(m, UniLoraLinear) for m in model.modules())


def test_second_bias_adapter_is_refused():
    model = TABLE.build(fastpeft, "mlp_bias_only")
    oh.assert_add_adapter_refused(model, "other", UniLoraConfig(target_modules=["lin0"], bias="all"),
                                  "one UniLoRA adapter")


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), UniLoraConfig(r=2))


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """theta_d and scale dtypes (fp32 with autocast_adapter_dtype, else the base's), outputs and merge as HF
    PEFT; the saved files hold the same dtypes and values."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp_save_indices", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        base = TABLE.base("mlp").to(torch.bfloat16)
        config = TABLE.config(lib, "mlp_save_indices")
        model = lib.get_peft_model(base, config, autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_save_indices") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "mlp_save_indices"])
def test_low_cpu_mem_usage_load(case, tmp_path):
    model, x = TABLE.build(fastpeft, case), TABLE.inputs(case)
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "low_cpu_mem_usage")


@pytest.mark.parametrize("field,value", [("r", 10**9), ("theta_d_length", 10**12)])
def test_oversize_sizes_in_file_are_refused(field, value, tmp_path):
    """A size no model could hold is refused from the config file before anything is allocated."""
    TABLE.build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    oh.rewrite_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"UniLoraConfig.{field}={value} .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


def test_file_without_theta_is_refused(tmp_path):
    from safetensors.torch import save_file
    TABLE.build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    save_file({"other": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    model = models.make_mlp()
    with pytest.raises(ValueError, match="lacks 'base_model.unilora_theta_d'"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    assert not any(isinstance(m, UniLoraLinear) for m in model.modules())
