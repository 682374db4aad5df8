"""(IA)^3 against HF PEFT 0.21.2: files both ways, outputs, gradients, merging, several adapters, weighted
adapters."""

from __future__ import annotations

import logging
from functools import partial

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.methods.ia3 import IA3Config, IA3Model
from fastpeft.methods.ia3.defaults import IA3_FEEDFORWARD, IA3_TARGETS
from state_helpers import copy_adapter

import models
import oracle_helpers
from cases import table_row

ATOL = 1e-5

CASES = {
    "mlp": table_row("ia3-mlp"),
    "mlp_regex": ("mlp", dict(target_modules=r"lin\d", feedforward_modules="lin0")),
    "mlp_save_head": table_row("ia3-mlp-save-head"),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"],
                              feedforward_modules=["gconv", "conv1"])),
    "conv2d_out": ("conv2d", dict(target_modules=["conv0", "gconv"], feedforward_modules=["conv0"])),
    "conv3d": table_row("ia3-conv3d"),
    "gpt2_conv1d": table_row("ia3-gpt2-conv1d"),
    "llama": table_row("ia3-llama"),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM")),
    "bert": table_row("ia3-bert-cls"),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM")),
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear",
                                       feedforward_modules=r".*\.(down|up)_proj")),
}
TABLE = oracle_helpers.CaseTable(CASES, IA3Config, peft.IA3Config, scale=0.3)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF save -> fastpeft load and fastpeft save -> HF load give the same outputs, keys, values and
    config."""
    hf = build(peft, case)
    oracle_helpers.assert_differs(models.forward(hf, inputs(case)), models.forward(base(case), inputs(case)))
    oracle_helpers.assert_files_both_ways(hf, partial(base, case), inputs(case), tmp_path, close)
    assert any(".ia3_l" in k for k in load_file(str(tmp_path / "hf" / "adapter_model.safetensors")))


@pytest.mark.parametrize("case", ["mlp", "conv2d", "gpt2_conv1d", "llama", "t5"])
def test_fresh_adapter_files_match_hf(case, tmp_path):
    """Built by each library from the same config: identical files (vectors of ones) and configs."""
    for lib, sub in ((peft, "hf"), (fastpeft, "fp")):
        model = lib.get_peft_model(base(case), config(lib, case))
        close(models.forward(model.eval(), inputs(case)), models.forward(base(case), inputs(case)), "init")
        model.save_pretrained(str(tmp_path / sub))
    oracle_helpers.assert_same_files(tmp_path / "fp", tmp_path / "hf")


# (mlp, gpt2_conv1d, llama and bert are the contract rows ia3-*: tests/core/test_oracle_matrix.py takes their
# training step)
def test_training_step_gradients_match_hf():
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, "conv2d"), build(peft, "conv2d"),
                                            inputs("conv2d"), close, ".ia3_l")


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp", "conv2d", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    """Several adapters merged multiply in; unmerging divides (same eps as HF: bit-identical base weights)."""
    oracle_helpers.assert_adapters_merge_like_hf(_two_adapters(fastpeft, case), _two_adapters(peft, case),
                                                 inputs(case), close, exact_unmerge=True)


def test_disable_adapter_and_unload_give_base():
    fp = build(fastpeft, "llama")
    x, base_out = inputs("llama"), models.forward(base("llama"), inputs("llama"))
    adapted = models.forward(fp, x)
    oracle_helpers.assert_differs(adapted, base_out)
    with fp.disable_adapter():
        close(models.forward(fp, x), base_out, "disabled")
    fp.merge_adapter()
    with fp.disable_adapter():  # a merged adapter is unmerged first
        close(models.forward(fp, x), base_out, "disabled after merge")
    close(models.forward(fp, x), adapted, "enabled again")
    close(models.forward(fp.unload(), x), base_out, "unload")


def test_disable_set_delete_and_mixed_batch_match_hf():
    x = inputs("llama")
    oracle_helpers.assert_adapter_switching_like_hf(_two_adapters(fastpeft, "llama"),
                                                    _two_adapters(peft, "llama"), x,
                                                    models.forward(base("llama"), x), close)


def test_mixed_batch_rows_match_hf_single_adapter_runs():
    """Each row with its own adapter (core's grouped path) equals HF PEFT run with that adapter alone."""
    x_mlp = inputs("mlp")
    hf, fp = _two_adapters(peft, "mlp"), _two_adapters(fastpeft, "mlp")
    names = ["default", "other", "__base__"] * (len(x_mlp) // 3 + 1)
    names = names[:len(x_mlp)]
    mixed = models.forward(fp, {"x": x_mlp, "adapter_names": names})
    for i, name in enumerate(names):
        if name == "__base__":
            with hf.disable_adapter():
                alone = models.forward(hf, x_mlp[i:i + 1])
        else:
            hf.set_adapter(name)
            alone = models.forward(hf, x_mlp[i:i + 1])
        close(mixed[i:i + 1], alone, f"row {i} ({name})")


def _weighted(lib, first: dict, second: dict, weights):
    model = lib.get_peft_model(models.make_mlp(), TABLE.classes[lib](**first))
    model.add_adapter("b", TABLE.classes[lib](**second))
    models.perturb(model, 3, 0.3, wanted=lambda n: ".ia3_l." in n)
    model.base_model.add_weighted_adapter(["default", "b"], weights, "mix")
    model.set_adapter("mix")
    return model


@pytest.mark.parametrize("first,second", [
    (dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
     dict(target_modules=["lin1", "head"], feedforward_modules=["lin1"])),
    (dict(target_modules="lin0", feedforward_modules="lin0"),
     dict(target_modules="lin1", feedforward_modules="x")),
])
def test_add_weighted_adapter_matches_hf(first, second, tmp_path):
    hf = _weighted(peft, first, second, [0.7, -0.4])
    fp = _weighted(fastpeft, first, second, [0.7, -0.4])
    hf_cfg, fp_cfg = hf.peft_config["mix"], fp.peft_config["mix"]
    assert ((fp_cfg.target_modules, fp_cfg.feedforward_modules)
            == (hf_cfg.target_modules, hf_cfg.feedforward_modules))
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf, adapter_name="mix"), fastpeft.get_peft_model_state_dict(
        fp, adapter_name="mix")
    assert set(fp_sd) == set(hf_sd)
    for key in hf_sd:
        close(fp_sd[key], hf_sd[key], key)
    close(models.forward(fp, models.mlp_inputs()), models.forward(hf, models.mlp_inputs()), "mix active")
    trainable = [{n: p.requires_grad for n, p in m.named_parameters() if ".mix" in n} for m in (fp, hf)]
    assert trainable[0] == trainable[1]
    fp.base_model.add_weighted_adapter(["default"], [2.0], "mix")  # exists already: nothing happens (as HF)
    again = fastpeft.get_peft_model_state_dict(fp, adapter_name="mix")
    assert all(torch.equal(again[k], fp_sd[k]) for k in fp_sd)


def test_add_weighted_adapter_refusals():
    fp = fastpeft.get_peft_model(models.make_mlp(),
                                 IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="do not exist"):
        fp.base_model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        fp.base_model.add_weighted_adapter(["default"], [1.0, 2.0], "mix")
    fp.add_adapter("regex", IA3Config(target_modules="lin1", feedforward_modules="lin1"))
    with pytest.raises(ValueError, match="different kinds"):
        fp.base_model.add_weighted_adapter(["default", "regex"], [1.0, 1.0], "mix")
    saved = fastpeft.get_peft_model(models.make_mlp(), IA3Config(
        target_modules=["lin0"], feedforward_modules=[], modules_to_save=["head"]))
    saved.add_adapter("two", IA3Config(target_modules=["lin1"], feedforward_modules=[],
                                       modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        saved.base_model.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix")
    assert "mix" not in fp.peft_config and "mix" not in saved.peft_config


def test_default_tables_equal_hf():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as HF_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as HF_TARGETS,
    )

    assert IA3_TARGETS == HF_TARGETS and IA3_FEEDFORWARD == HF_FF


def test_hf_all_linear_adapter_with_listed_feedforward_loads(tmp_path):
    """HF PEFT saves 'all-linear' as full names and then refuses its own file (feedforward_modules not a
    subset); fastpeft accepts feed-forward entries that end target names and gives HF's outputs."""
    kw = dict(task_type="CAUSAL_LM", target_modules="all-linear",
              feedforward_modules=["down_proj", "up_proj"])
    hf = models.perturb(peft.get_peft_model(models.make_llama(), peft.IA3Config(**kw)), 0, 0.3).eval()
    hf.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="subset"):
        peft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path)).eval()
    close(models.forward(fp, models.llama_inputs()), models.forward(hf, models.llama_inputs()), "all-linear")
    assert fp.base_model.model.model.layers[0].mlp.up_proj.is_feedforward


def test_init_false_gives_random_vectors_of_hf_shapes():
    hf = peft.get_peft_model(models.make_conv2d(), config(peft, "conv2d", init_ia3_weights=False))
    fp = fastpeft.get_peft_model(models.make_conv2d(), config(fastpeft, "conv2d", init_ia3_weights=False))
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf), fastpeft.get_peft_model_state_dict(fp)
    assert {k: v.shape for k, v in fp_sd.items()} == {k: v.shape for k, v in hf_sd.items()}
    assert all(not torch.equal(v, torch.ones_like(v)) for v in fp_sd.values())


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="not in target_modules"):
        IA3Config(target_modules=["lin0"], feedforward_modules=["lin1"])
    with pytest.raises(ValueError, match="feedforward_modules explicitly"):
        fastpeft.get_peft_model(models.make_mlp(), IA3Config(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="no default target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), IA3Config(feedforward_modules=[]))
    with pytest.raises(ValueError, match="cannot wrap module 'conv0' of type Conv1d"):
        fastpeft.get_peft_model(models.make_conv1d(),
                                IA3Config(target_modules=["conv0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="cannot wrap module 'emb' of type Embedding"):
        fastpeft.get_peft_model(models.make_emb(), IA3Config(target_modules=["emb"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(target_modules=["lin0"], init_ia3_weights="ones")


def test_unmerge_with_zero_entries_is_refused_and_layer_stays_merged():
    fp = build(fastpeft, "mlp")
    x = inputs("mlp")
    with torch.no_grad():
        fp.base_model.model.lin0.ia3_l["default"][3] = 0.0
    adapted = models.forward(fp, x)
    fp.merge_adapter()
    with pytest.raises(ValueError, match="zero entries"):
        fp.unmerge_adapter()
    assert fp.base_model.model.lin0.merged
    close(models.forward(fp, x), adapted, "still merged")
    close(models.forward(fp.merge_and_unload(), x), adapted, "merge_and_unload")


def test_fan_in_fan_out_corrected_per_layer_and_role_kept(caplog):
    with caplog.at_level(logging.WARNING):
        fp = fastpeft.get_peft_model(models.make_conv1d_gpt2(), config(fastpeft, "gpt2_conv1d"))
    assert fp.peft_config["default"].fan_in_fan_out is True and "fan_in_fan_out=True" in caplog.text
    with caplog.at_level(logging.WARNING):
        fp.add_adapter("other", IA3Config(target_modules=["c_fc", "c_proj"], feedforward_modules=["c_fc"]))
    assert "keeps its first role" in caplog.text
    assert fp.base_model.model.c_fc.ia3_l["other"].shape == (24, 1)  # c_fc stays output-scaled, as in HF PEFT
    assert isinstance(fp.base_model, IA3Model) and isinstance(fp.base_model.model.head, nn.Linear)


@pytest.mark.parametrize("case", ["llama", "conv2d"])
def test_bf16_base_with_float32_vectors_matches_hf_bitwise(case):
    x = inputs(case)
    x = x if isinstance(x, dict) else x.to(torch.bfloat16)
    hf = models.perturb(peft.get_peft_model(base(case).to(torch.bfloat16), config(peft, case)), 0, 0.3).eval()
    fp = fastpeft.get_peft_model(base(case).to(torch.bfloat16), config(fastpeft, case)).eval()
    copy_adapter(peft, hf, fastpeft, fp)
    assert all(p.dtype == torch.float32 for n, p in fp.named_parameters() if ".ia3_l." in n)
    out = models.forward(fp, x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, models.forward(hf, x))
