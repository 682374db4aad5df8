"""RandLoRA against HF PEFT 0.21.2 (the oracle): shared bases (dense / sparse / very sparse) bit for bit,
outputs, gradients, adapter files in both directions (with and without saved bases), merging, several
adapters, refusals."""

from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.randlora import RandLoraConfig, RandLoraModel

import models
import oracle_helpers
from cases import table_row

ATOL = 1e-5

# small randlora_alpha: the default 640 / r blows perturbed outputs up beyond float tolerance
CASES = {
    # head (20 -> 2) has its smaller side at the output: the other factor order
    "mlp": table_row("randlora-mlp"),
    "gpt2_conv1d": ("conv1d_gpt2", dict(r=3, randlora_alpha=6, target_modules=["c_fc", "c_proj"], sparse=True,
                                        projection_prng_key=3)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=8, randlora_alpha=16,
                            target_modules=["q_proj", "v_proj", "down_proj"])),
    # default: c_attn
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", r=5, randlora_alpha=10, very_sparse=True)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=4, randlora_alpha=8, target_modules=["query", "value"],
                              bias="randlora_only")),
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=16, randlora_alpha=32,
                                       target_modules="all-linear")),
}
TABLE = oracle_helpers.CaseTable(CASES, RandLoraConfig, peft.RandLoraConfig, scale=0.1)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------- projections
BASES = {"dense": {}, "sparse": {"sparse": True}, "very_sparse": {"very_sparse": True}}


@pytest.mark.parametrize("case", ["mlp", "llama"])
@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("seed", [0, 1234])
def test_bases_bitwise_equal_to_hf(case, kind, seed):
    extra = {"sparse": False, **BASES[kind], "projection_prng_key": seed}
    ours = fastpeft.get_peft_model(base(case), config(fastpeft, case, **extra))
    theirs = peft.get_peft_model(base(case), config(peft, case, **extra))
    oracle_helpers.assert_shared_tensors_equal(ours, theirs, ("randlora_A", "randlora_B"))
    assert isinstance(ours.base_model, RandLoraModel)


def test_bases_sized_for_the_largest_layer():
    # MLP: lin0 (10 -> 20), head (20 -> 2): largest (out, in) = (20, 20); ceil(20 / 3) = 7 bases of rank 3
    model = fastpeft.get_peft_model(base("mlp"),
                                    config(fastpeft, "mlp", r=3, target_modules=["lin0", "head"]))
    assert model.base_model.randlora_A["default"].shape == (3, 1, 20)
    assert model.base_model.randlora_B["default"].shape == (20, 7, 3)
    lin0 = model.base_model.model.lin0  # smaller side 10: ceil(10 / 3) = 4 bases
    assert lin0.randlora_lambda["default"].shape == (3, 4) and lin0.randlora_gamma["default"].shape == (4, 10)
    sparse = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", sparse=True))
    for attr in ("randlora_A", "randlora_B"):  # ternary (-c, 0, c), scaled to unit std
        values = torch.unique(getattr(sparse.base_model, attr)["default"])
        assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]


def _seeded_state(lib, seed, **extra):
    torch.manual_seed(seed)
    return lib.get_peft_model_state_dict(lib.get_peft_model(base("mlp"), config(lib, "mlp", **extra)))


@pytest.mark.parametrize("seed, extra", [(0, {"init_weights": False}), (1, {})])
def test_init_matches_hf(seed, extra):
    sd_a, sd_b = _seeded_state(fastpeft, seed, **extra), _seeded_state(peft, seed, **extra)
    oracle_helpers.assert_same_state_dict(sd_a, sd_b)


def test_default_init_is_a_no_op():
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp"))
    assert not model.base_model.model.lin0.randlora_lambda["default"].any()
    close(models.forward(model, inputs("mlp")), models.forward(base("mlp"), inputs("mlp")), "no-op at init")


# -------------------------------------------------------------------------------------------- outputs / files
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("save_projection", [True, False])
def test_files_both_ways(case, save_projection, tmp_path):
    """Built alike, both libraries save the same file; each loads the other's. Saved bases stand once under
    base_model. and again under every adapted layer, as HF PEFT writes them."""
    theirs, ours = (build(lib, case, save_projection=save_projection) for lib in (peft, fastpeft))
    close(models.forward(ours, inputs(case)), models.forward(theirs, inputs(case)), "built alike")
    oracle_helpers.assert_files_both_ways(theirs, partial(base, case), inputs(case), tmp_path, close)
    ours.save_pretrained(str(tmp_path / "built"))
    oracle_helpers.assert_same_files(tmp_path / "built", tmp_path / "hf")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert ({"base_model.randlora_A", "base_model.randlora_B"} <= keys) == save_projection
    per_layer = [k for k in keys if k.startswith("base_model.model.")
                 and k.endswith((".randlora_A", ".randlora_B"))]
    assert bool(per_layer) == save_projection


# ---------------------------------------------------------------------------------------------- training
# (the "mlp" case is the contract row randlora-mlp: tests/core/test_oracle_matrix.py takes its training step)
@pytest.mark.parametrize("case", ["gpt2_conv1d", "llama", "bert"])
def test_gradients_equal_hf(case):
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close,
                                            ".randlora_")


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_equal_hf(case):
    oracle_helpers.assert_merges_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close)


# ----------------------------------------------------------------------------------------- shared projections
class TestSharedProjections(oracle_helpers.SharedProjectionTests):
    """Loaded from the file, shared by a second adapter (as in HF PEFT), dropped on delete, refusals."""

    table, attr, close = TABLE, "randlora_A", staticmethod(close)
    other = dict(randlora_alpha=3, randlora_dropout=0.1)
    larger_layer = "randlora_A has size 2 in dimension 2 but .* needs 10"


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"bias": "lora_only"}, "bias must be one of"),
    ({"randlora_dropout": 1.0}, "dropout"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        RandLoraConfig(target_modules=["lin0"], **bad)


def test_unsupported_layer_is_refused():
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), RandLoraConfig(r=4, target_modules=["emb", "lin"]))
