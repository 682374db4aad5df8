"""VeRA against HF PEFT 0.21.2 (the oracle): shared projections bit for bit, outputs, gradients, adapter files
in both directions (with and without saved projections), merging, several adapters, refusals."""

from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.vera import VeraConfig, VeraModel

import models
import oracle_helpers

ATOL = 1e-5

CASES = {
    "mlp": ("mlp", dict(r=4, target_modules=["lin0", "lin1", "head"])),
    "gpt2_conv1d": ("conv1d_gpt2", dict(r=6, target_modules=["c_fc", "c_proj"], projection_prng_key=3)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", r=4)),  # default targets (c_attn)
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], bias="vera_only")),
    "llama_layer1": ("llama", dict(task_type="CAUSAL_LM", r=4, target_modules=["k_proj", "up_proj"],
                                   layers_to_transform=[1], layers_pattern="layers")),
}
TABLE = oracle_helpers.CaseTable(CASES, VeraConfig, peft.VeraConfig, scale=0.1)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------- projections
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("seed", [0, 1234])
def test_projections_bitwise_equal_to_hf(case, seed):
    ours = fastpeft.get_peft_model(base(case), config(fastpeft, case, projection_prng_key=seed))
    theirs = peft.get_peft_model(base(case), config(peft, case, projection_prng_key=seed))
    oracle_helpers.assert_shared_tensors_equal(ours, theirs, ("vera_A", "vera_B"))
    assert isinstance(ours.base_model, VeraModel)


def test_projections_sized_for_the_largest_layer():
    # MLP: lin0 (10 -> 20), lin1 (20 -> 20), head (20 -> 2): A covers the widest input, B the widest output
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", target_modules=["lin0", "head"]))
    assert model.base_model.vera_A["default"].shape == (4, 20)
    assert model.base_model.vera_B["default"].shape == (20, 4)


def test_init_matches_hf():
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", init_weights=False))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base("mlp"), config(peft, "mlp", init_weights=False))
    sd_a, sd_b = fastpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    oracle_helpers.assert_same_state_dict(sd_a, sd_b)
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", d_initial=0.25))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.vera_lambda_d["default"], torch.full((4,), 0.25))
    assert not layer.vera_lambda_b["default"].any()
    close(models.forward(model, inputs("mlp")), models.forward(base("mlp"), inputs("mlp")), "no-op at init")


# -------------------------------------------------------------------------------------------- outputs / files
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("save_projection", [True, False])
def test_files_both_ways(case, save_projection, tmp_path):
    """Built alike, both libraries save the same file; each loads the other's. The projections are stored
    once, under base_model. (not per layer), or not at all."""
    theirs, ours = (build(lib, case, save_projection=save_projection) for lib in (peft, fastpeft))
    close(models.forward(ours, inputs(case)), models.forward(theirs, inputs(case)), "built alike")
    oracle_helpers.assert_files_both_ways(theirs, partial(base, case), inputs(case), tmp_path, close)
    ours.save_pretrained(str(tmp_path / "built"))
    oracle_helpers.assert_same_files(tmp_path / "built", tmp_path / "hf")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    assert not any(k.endswith((".vera_A", ".vera_B")) and k.startswith("base_model.model.") for k in keys)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "bert"])
def test_gradients_equal_hf(case):
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close,
                                            ".vera_lambda")


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_equal_hf(case):
    oracle_helpers.assert_merges_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close)


# ----------------------------------------------------------------------------------------- shared projections
class TestSharedProjections(oracle_helpers.SharedProjectionTests):
    """Loaded from the file, shared by a second adapter (as in HF PEFT), dropped on delete, refusals."""

    table, attr, close = TABLE, "vera_A", staticmethod(close)
    other = dict(d_initial=0.3, vera_dropout=0.1)
    larger_layer = "vera_A has size 2.*needs 10|vera_B has size 2.*needs 20"


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"bias": "lora_only"}, "bias must be one of"),
    ({"vera_dropout": 1.0}, "dropout"),
    ({"layers_pattern": "layers"}, "layers_to_transform"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        VeraConfig(target_modules=["lin0"], **bad)


def test_unsupported_layer_is_refused():
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), VeraConfig(r=4, target_modules=["emb", "lin"]))
