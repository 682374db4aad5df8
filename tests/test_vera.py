"""VeRA against HF PEFT 0.21.2 (the oracle): shared projections bit for bit, outputs, gradients, adapter files in
both directions (with and without saved projections), merging, several adapters, refusals."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.vera import VeraConfig, VeraModel

import models

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
CONFIG_FIELDS = ("r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                 "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "peft_type")


def config(lib, case, **extra):
    cls = VeraConfig if lib is fastpeft else peft.VeraConfig  # (fastpeft's top-level export comes later)
    return cls(**{**copy.deepcopy(CASES[case][1]), **extra})


def base(case):
    return models.MODELS[CASES[case][0]][0]()


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    """A VeRA model of `lib` on the case's base model with every trainable tensor perturbed (same names in both)."""
    model = lib.get_peft_model(base(case), config(lib, case, **extra))
    return models.perturb(model, seed, 0.1).eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def file_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_files(ours, theirs):
    a, b = file_tensors(ours), file_tensors(theirs)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ca, cb = (json.loads((p / "adapter_config.json").read_text()) for p in (ours, theirs))
    assert {k: _unordered(ca[k]) for k in CONFIG_FIELDS} == {k: _unordered(cb[k]) for k in CONFIG_FIELDS}


def _unordered(value):
    return sorted(value) if isinstance(value, list) else value  # HF writes sets in arbitrary order


# ---------------------------------------------------------------------------------------------- projections
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("seed", [0, 1234])
def test_projections_bitwise_equal_to_hf(case, seed):
    ours = fastpeft.get_peft_model(base(case), config(fastpeft, case, projection_prng_key=seed))
    theirs = peft.get_peft_model(base(case), config(peft, case, projection_prng_key=seed))
    for attr in ("vera_A", "vera_B"):
        a, b = getattr(ours.base_model, attr)["default"], getattr(theirs.base_model, attr)["default"]
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), attr
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
    assert sorted(sd_a) == sorted(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", d_initial=0.25))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.vera_lambda_d["default"], torch.full((4,), 0.25))
    assert not layer.vera_lambda_b["default"].any()
    close(models.forward(model, inputs("mlp")), models.forward(base("mlp"), inputs("mlp")), "no-op at init")


# ---------------------------------------------------------------------------------------------- outputs / files
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_files_equal_hf(case, tmp_path):
    ours, theirs = build(fastpeft, case), build(peft, case)
    close(models.forward(ours, inputs(case)), models.forward(theirs, inputs(case)), "outputs")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert_same_files(tmp_path / "ours", tmp_path / "theirs")
    keys = file_tensors(tmp_path / "ours")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(keys)
    assert not any(k.endswith((".vera_A", ".vera_B")) and k.startswith("base_model.model.") for k in keys)


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "bert"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_files_load_both_ways(case, save_projection, tmp_path):
    theirs = build(peft, case, save_projection=save_projection)
    expected = models.forward(theirs, inputs(case))
    theirs.save_pretrained(tmp_path / "hf")
    ours = fastpeft.PeftModel.from_pretrained(base(case), tmp_path / "hf")
    close(models.forward(ours, inputs(case)), expected, "HF file -> fastpeft")
    ours.save_pretrained(tmp_path / "ours")
    assert_same_files(tmp_path / "ours", tmp_path / "hf")
    back = peft.PeftModel.from_pretrained(base(case), tmp_path / "ours")
    close(models.forward(back, inputs(case)), expected, "fastpeft file -> HF")


def test_saved_projections_are_loaded_not_redrawn(tmp_path):
    """A file's projections win over the seed: change them in the HF model, both libraries must use the file's."""
    theirs = build(peft, "mlp")
    with torch.no_grad():
        theirs.base_model.vera_A["default"].mul_(1.5)
    expected = models.forward(theirs, inputs("mlp"))
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.PeftModel.from_pretrained(base("mlp"), tmp_path)
    close(models.forward(ours, inputs("mlp")), expected, "file projections")


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "bert"])
def test_gradients_equal_hf(case):
    grads = []
    for lib in (fastpeft, peft):
        model = build(lib, case).train()
        x = inputs(case)
        out = model(**x) if isinstance(x, dict) else model(x)
        (out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1])
    for name in grads[0]:
        close(grads[0][name], grads[1][name], name)


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_equal_hf(case):
    ours, theirs = build(fastpeft, case), build(peft, case)
    expected = models.forward(theirs, inputs(case))
    theirs.merge_adapter()
    models.assert_merge_roundtrip(ours, inputs(case), models.forward(theirs, inputs(case)), close)
    theirs.unmerge_adapter()
    close(models.forward(ours, inputs(case)), expected, "unmerged")
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    close(models.forward(merged_ours, inputs(case)), models.forward(merged_theirs, inputs(case)), "merge_and_unload")
    close(models.forward(merged_ours, inputs(case)), expected, "merged == adapted")
    sd_a, sd_b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for key in sd_a:
        close(sd_a[key], sd_b[key], key)


# ---------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_second_adapter_shares_projections_like_hf(case, tmp_path):
    results = []
    for lib in (fastpeft, peft):
        model = build(lib, case)
        model.add_adapter("other", config(lib, case, d_initial=0.3, vera_dropout=0.1))
        models.perturb(model, 5, 0.1, wanted=lambda n: ".other" in n)
        tm = model.base_model
        assert tm.vera_A["other"] is tm.vera_A["default"]
        model.set_adapter("other")
        other = models.forward(model.eval(), inputs(case))
        with model.disable_adapter():
            disabled = models.forward(model, inputs(case))
        model.save_pretrained(tmp_path / lib.__name__)
        results.append((other, disabled))
    close(results[0][0], results[1][0], "second adapter")
    close(results[0][1], models.forward(base(case), inputs(case)), "disabled")
    assert_same_files(tmp_path / "fastpeft" / "other", tmp_path / "peft" / "other")
    loaded = fastpeft.PeftModel.from_pretrained(base(case), tmp_path / "peft" / "other", adapter_name="other")
    close(models.forward(loaded, inputs(case)), results[1][0], "HF 'other' file -> fastpeft")


def test_delete_adapter_drops_its_projections():
    model = build(fastpeft, "mlp")
    model.add_adapter("other", config(fastpeft, "mlp"))
    model.delete_adapter("other")
    assert list(model.base_model.vera_A.keys()) == ["default"]
    assert not any(".other" in k for k in model.state_dict())


# ---------------------------------------------------------------------------------------------- refusals
def test_second_adapter_with_other_seed_r_or_save_projection_is_refused():
    model = build(fastpeft, "mlp")
    with pytest.raises(ValueError, match="projection_prng_key must be the same"):
        model.add_adapter("seed", config(fastpeft, "mlp", projection_prng_key=7))
    with pytest.raises(ValueError, match="same r"):
        model.add_adapter("rank", config(fastpeft, "mlp", r=8))
    with pytest.raises(ValueError, match="save_projection"):
        model.add_adapter("nosave", config(fastpeft, "mlp", save_projection=False))
    assert sorted(model.peft_config) == ["default"] and list(model.base_model.vera_A.keys()) == ["default"]


def test_second_adapter_on_a_larger_layer_is_refused():
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", target_modules=["head"]))
    with pytest.raises(ValueError, match="vera_A has size 2.*needs 10|vera_B has size 2.*needs 20"):
        model.add_adapter("big", config(fastpeft, "mlp", target_modules=["lin0"]))
    assert sorted(model.peft_config) == ["default"]
    assert not any(".big" in k for k in model.state_dict())


def test_file_without_projections_but_save_projection_true_is_refused(tmp_path):
    build(peft, "mlp", save_projection=False).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["save_projection"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks.*save_projection"):
        fastpeft.PeftModel.from_pretrained(base("mlp"), tmp_path)


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
