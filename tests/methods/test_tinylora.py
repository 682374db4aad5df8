"""TinyLoRA (a trained vector v mixing frozen random matrices P between the frozen SVD factors of each weight,
v tied across layers by weight_tying) against HF PEFT 0.21.2: files both ways with and without saved
projections, seeded init, gradients, dropout, merging, several adapters, mixed batches, bf16,
low_cpu_mem_usage, errors. (Rows tinylora-* of tests/cases.py also run through the contract and oracle
matrices.)"""

from __future__ import annotations

import logging
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.methods.tinylora import TinyLoraConfig, TinyLoraLayer
from fastpeft.methods.tinylora.model import group_of

import models
import oracle_helpers as oh
from cases import table_row

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

UNIFORM = dict(init_weights="uniform", init_v_bound=0.5)
CASES = {
    "mlp": table_row("tinylora-mlp"),
    "mlp_tied_bias_only": table_row("tinylora-mlp-tied-bias-only"),
    "mlp_no_projection": table_row("tinylora-mlp-no-projection"),
    "mlp_dropout": ("mlp", dict(r=2, u=6, target_modules=["lin0", "lin1"], tinylora_dropout=0.3)),
    "mlp_bias_all": ("mlp", dict(r=2, u=3, target_modules=["lin0"], bias="all")),
    "emb": table_row("tinylora-embedding"),
    "gpt2_conv1d": table_row("tinylora-gpt2-conv1d"),
    "llama": table_row("tinylora-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, u=5, target_modules="all-linear",
                                       weight_tying=0.4)),
}
TABLE = oh.CaseTable(CASES, TinyLoraConfig, peft.TinyLoraConfig, scale=0.3, init_seed=0)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def layers(model) -> dict[str, TinyLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TinyLoraLayer)}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # HF PEFT warns about save_projection=False on every config
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """(save_projection False: files without P, drawn again from projection_seed on both sides; bias cases:
    the biases train as in HF PEFT and travel in the file.)"""
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


def test_file_keys(tmp_path):
    """Each v once under the tuner's key; A and B per layer; P per layer only with save_projection."""
    for case in ("mlp", "mlp_no_projection"):
        TABLE.build(fastpeft, case).save_pretrained(str(tmp_path / case))
    keys = load_file(str(tmp_path / "mlp" / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(f"base_model.model.{layer}.tinylora_{t}" for layer in ("lin0", "lin1")
                                  for t in "ABP") + ["base_model.tinylora_v.0", "base_model.tinylora_v.1"]
    assert keys["base_model.model.lin0.tinylora_P"].shape == (8, 2, 2)
    no_p = load_file(str(tmp_path / "mlp_no_projection" / "adapter_model.safetensors"))
    assert not any(k.endswith("tinylora_P") for k in no_p) and "base_model.tinylora_v.0" in no_p


@pytest.mark.parametrize("case", ["mlp", "mlp_tied_bias_only", "emb", "gpt2_conv1d", "llama_all_linear"])
def test_init_matches_hf(case):
    """The same global RNG state -> the same v ('uniform'), SVD factors and P (the whole state dict), the
    same trainable names, and the RNG left where HF PEFT leaves it."""
    ours = TABLE.fresh(fastpeft, case, **UNIFORM)
    after_ours = torch.rand(3)
    theirs = TABLE.fresh(peft, case, **UNIFORM)
    after_theirs = torch.rand(3)
    oh.assert_same_state_dict(ours.state_dict(), theirs.state_dict())
    assert ([n for n, p in ours.named_parameters() if p.requires_grad]
            == [n for n, p in theirs.named_parameters() if p.requires_grad])
    assert torch.equal(after_ours, after_theirs)


def test_default_init_is_a_no_op():
    model, x = TABLE.fresh(fastpeft, "mlp"), TABLE.inputs("mlp")
    close(models.forward(model, x), models.forward(TABLE.base("mlp"), x), "v = 0")


@pytest.mark.parametrize("count,tying,groups", [
    (3, 0.0, ["0", "1", "2"]), (3, 0.5, ["0", "1", "1"]), (3, 1.0, ["0", "0", "0"]),
    (5, 0.4, ["0", "1", "2", "2", "2"]), (4, 0.6, ["0", "0", "1", "1"])])
def test_weight_tying_groups(count, tying, groups):
    assert [group_of(i, count, tying) for i in range(count)] == groups


def test_tied_layers_share_one_vector():
    model = TABLE.build(fastpeft, "mlp_tied_bias_only")
    found = layers(model)
    assert len({id(m.vector("default")) for m in found.values()}) == 1
    assert model.get_nb_trainable_parameters()[0] == 4 + 20 + 20 + 2  # v and the three biases


def test_rank_is_clipped_to_small_layers_as_hf():
    """r larger than a layer's smaller side uses that side (HF PEFT's behaviour): head is (2, 20)."""
    ours, theirs = (TABLE.fresh(lib, "mlp_tied_bias_only") for lib in (fastpeft, peft))
    head = ours.base_model.model.head
    assert head.r["default"] == 2 and tuple(head.tinylora_A["default"].shape) == (2, 20)
    assert theirs.base_model.model.head.r["default"] == 2


@pytest.mark.parametrize("case", ["mlp", "mlp_tied_bias_only", "emb", "gpt2_conv1d", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "tinylora_v")


def test_dropout_draws_like_hf():
    hf, fp = oh.same_adapter_pair(TABLE, "mlp_dropout")
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs("mlp_dropout"), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", ["mlp", "mlp_dropout", "emb", "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, u=3, weight_tying=1.0, target_modules=["lin1", "head"])


def test_second_adapter_files_match_hf(tmp_path):
    """A second adapter on other targets: its groups come from its own numbering, its P from the number
    the layer got when it was created (as HF PEFT); its folder holds HF PEFT's keys and values."""
    theirs, ours = (oh.build_with_other(TABLE, lib, "mlp", u=3, target_modules=["lin1", "head"])
                    for lib in (peft, fastpeft))
    for lib, model in (("hf", theirs), ("ours", ours)):
        model.save_pretrained(str(tmp_path / lib), selected_adapters=["other"])
    oh.assert_same_files(tmp_path / "ours" / "other", tmp_path / "hf" / "other")


@pytest.mark.parametrize("case", ["mlp", "emb"])
def test_mixed_batch_runs_each_row_with_its_adapter(case):
    model = oh.build_with_other(TABLE, fastpeft, case, u=3)
    x = TABLE.inputs(case)
    x = torch.cat([x, x])[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_delete_adapter_drops_its_vectors_and_buffers():
    model = oh.build_with_other(TABLE, fastpeft, "mlp", u=3)
    model.delete_adapter("other")
    assert list(model.base_model.tinylora_v) == ["default"]
    assert not any(".other" in k for k in model.state_dict())


def test_saved_projections_are_loaded_not_redrawn(tmp_path):
    theirs, x = TABLE.build(peft, "mlp"), TABLE.inputs("mlp")
    with torch.no_grad():
        theirs.base_model.model.lin1.tinylora_P["default"].mul_(-2)
    expected = models.forward(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path)).eval()
    close(models.forward(ours, x), expected, "P from the file")


def test_projections_in_a_file_saying_save_projection_false_are_ignored(tmp_path, caplog):
    """As HF PEFT: P is drawn again from projection_seed (a warning says the file's are not used)."""
    model, x = TABLE.build(fastpeft, "mlp"), TABLE.inputs("mlp")
    model.save_pretrained(str(tmp_path))
    oh.rewrite_config(tmp_path, save_projection=False)
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        ours = fastpeft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path)).eval()
    assert "drawn again from projection_seed" in caplog.text
    theirs = peft.PeftModel.from_pretrained(TABLE.base("mlp"), str(tmp_path)).eval()
    close(models.forward(ours, x), models.forward(theirs, x), "HF PEFT alike")


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(u=0), "u must be a positive integer"),
    (dict(weight_tying=1.5), "weight_tying"),
    (dict(tinylora_dropout=1.0), "tinylora_dropout"),
    (dict(bias="lora_only"), "bias"),
    (dict(init_weights="gaussian"), "init_weights"),
    (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyLoraConfig(**kwargs)


def test_unsupported_layer_is_refused_and_model_untouched():
    model = models.MODELS["conv2d"][0]()
    with pytest.raises(ValueError, match="TinyLoRA cannot wrap module"):
        fastpeft.get_peft_model(model, TinyLoraConfig(target_modules=["conv0"]))
    assert not layers(model)


def test_second_adapter_with_other_save_projection_is_refused():
    """HF PEFT raises a TypeError; fastpeft's error is both a TypeError and a ValueError."""
    model = TABLE.build(fastpeft, "mlp")
    with pytest.raises(TypeError, match="save_projection"):
        model.add_adapter("x", TinyLoraConfig(target_modules=["lin0"], save_projection=False))
    config = TinyLoraConfig(target_modules=["lin0"], save_projection=False)
    oh.assert_add_adapter_refused(model, "other", config, "save_projection")
    assert list(model.base_model.tinylora_v) == ["default"]


def test_second_bias_adapter_is_refused():
    model = TABLE.build(fastpeft, "mlp_tied_bias_only")
    oh.assert_add_adapter_refused(model, "other", TinyLoraConfig(target_modules=["lin0"], bias="all"),
                                  "one TinyLoRA adapter")


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), TinyLoraConfig())


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(autocast, tmp_path):
    """v, A, B, P dtypes (float32 with autocast_adapter_dtype, else bf16), outputs and merge as HF PEFT; the
    saved files hold the same dtypes and values."""
    oh.assert_bf16_base_like_hf(TABLE, "mlp", autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        config = TABLE.config(lib, "mlp", **UNIFORM)
        base = TABLE.base("mlp").to(torch.bfloat16)
        model = lib.get_peft_model(base, config, autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "mlp_tied_bias_only") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "mlp_no_projection", "emb"])
def test_low_cpu_mem_usage_load(case, tmp_path):
    model, x = TABLE.build(fastpeft, case), TABLE.inputs(case)
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    close(models.forward(loaded.eval(), x), models.forward(model, x), "low_cpu_mem_usage")


@pytest.mark.parametrize("field,value", [("r", 10**9), ("u", 10**12)])
def test_oversize_sizes_in_file_are_refused(field, value, tmp_path):
    """A size no model could hold is refused from the config file before anything is allocated."""
    TABLE.build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    oh.rewrite_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"TinyLoraConfig.{field}={value} .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


def test_file_without_vectors_is_refused(tmp_path):
    TABLE.build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "tinylora_v" not in k},
              str(tmp_path / "adapter_model.safetensors"))
    model = models.make_mlp()
    with pytest.raises(ValueError, match="lacks .*base_model.tinylora_v.0"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    assert not layers(model)
