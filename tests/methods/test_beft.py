"""BEFT against HF PEFT 0.21.2: seeded init, files both ways, outputs, gradients, merging into the base bias
(refused without one), several adapters, mixed batches, refusals."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.beft import BeftConfig, BeftModel

import models
import oracle_helpers

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin


class NoBiasMLP(nn.Module):
    """lin0 without a bias (BEFT trains but cannot merge there), lin1 with one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20, bias=False)
        self.lin1 = nn.Linear(20, 20)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


MODEL_TABLE = {**models.MODELS, "no_bias_mlp": (lambda: NoBiasMLP().eval(), models.mlp_inputs)}
CASES = {
    # HF PEFT's own BEFT rows adapt the MLP's lin0 / lin1
    "mlp": ("mlp", dict(target_modules=["lin0"])),
    "mlp_two": ("mlp", dict(target_modules=["lin0", "lin1"])),
    "mlp_randn_save_head": ("mlp", dict(target_modules=["lin1"], init_weights=False,
                                        modules_to_save=["head"])),
    "no_bias": ("no_bias_mlp", dict(target_modules=["lin0", "lin1"])),
    "llama": ("llama", dict(task_type="CAUSAL_LM")),  # default target v_proj (no bias in tiny llama)
    "bert": ("bert_cls", dict(task_type="SEQ_CLS")),  # default target value (with a bias)
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear")),
}
TABLE = oracle_helpers.ModelCaseTable(CASES, BeftConfig, peft.BeftConfig, scale=0.3, model_table=MODEL_TABLE)
TABLE.init_seed = 7  # the vectors are drawn from the global RNG (even when zeroed after)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", ["mlp_two", "mlp_randn_save_head", "llama", "bert"])
def test_seeded_init_like_hf(case, tmp_path):
    """Same seed: the same vectors (drawn even when zeroed, so the RNG state after matches too)."""
    hf = TABLE.fresh(peft, case)
    hf_next = torch.randn(3)
    fp = TABLE.fresh(fastpeft, case)
    assert torch.equal(torch.randn(3), hf_next), "the global RNG is left in another state than HF PEFT's"
    oracle_helpers.assert_same_state_dict(fp.state_dict(), hf.state_dict())
    if CASES[case][1].get("init_weights", True):
        close(models.forward(fp, inputs(case)), models.forward(base(case), inputs(case)), "identity at init")
    oracle_helpers.assert_same_config_json(fp, hf, tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF save -> fastpeft load -> save gives HF's keys, tensors and config; each library loads the other's
    files with the same outputs (perturbed, non-identity adapters)."""
    oracle_helpers.assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp_two", "no_bias", "llama", "bert"])
def test_training_step_gradients_match_hf(case):
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case),
                                            lambda a, b, w: close(a, b, w, atol=1e-4), "beft_bias")


def _two_adapters(lib, case):
    model = build(lib, case)
    torch.manual_seed(3)
    model.add_adapter("other", config(lib, case, init_weights=False))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp", "mlp_two"])
def test_merge_unmerge_and_unload_match_hf(case):
    """Merging moves only the base biases (weights bit-identical), as HF PEFT."""
    ours = _two_adapters(fastpeft, case)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith("base_layer.weight")}
    oracle_helpers.assert_adapters_merge_like_hf(ours, _two_adapters(peft, case), inputs(case), close)
    merged = dict(ours.base_model.model.named_parameters())
    for name, weight in weights.items():
        key = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(merged[key], weight), name


def test_disable_set_delete_and_mixed_batch_match_hf():
    oracle_helpers.assert_adapter_switching_like_hf(_two_adapters(fastpeft, "llama"),
                                                    _two_adapters(peft, "llama"), inputs("llama"),
                                                    models.forward(base("llama"), inputs("llama")), close)


def test_mixed_batch_rows_use_their_own_adapter():
    model = _two_adapters(fastpeft, "mlp_two").eval()
    oracle_helpers.assert_mixed_batch_rows(model, inputs("mlp_two"), ["other", "__base__", "default"], close)


def test_second_adapter_files_like_hf(tmp_path):
    oracle_helpers.assert_second_adapter_like_hf(lambda lib: _two_adapters(lib, "mlp_two"),
                                                 lambda: base("mlp_two"), inputs("mlp_two"), tmp_path, close)


def test_merge_without_base_bias_is_refused_before_any_layer_merges():
    """HF PEFT raises at the first bias-less layer; fastpeft refuses before merging any layer."""
    model = build(fastpeft, "no_bias")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = models.forward(model, inputs("no_bias"))
    with pytest.raises(ValueError, match=r"BEFT cannot merge into layers without a bias: \['lin0'\]"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="without a bias"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="no bias to add it to"):
        model.base_model.model.lin0.merge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    close(models.forward(model, inputs("no_bias")), expected, "unchanged after the refusals")
    hf = build(peft, "no_bias")
    with pytest.raises(ValueError, match="no bias"):
        hf.merge_adapter()
    close(models.forward(model.unload(), inputs("no_bias")), models.forward(base("no_bias"),
                                                                           inputs("no_bias")), "unload")


def test_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="BEFT cannot wrap module 'c_fc'"):
        fastpeft.get_peft_model(models.make_conv1d_gpt2(), BeftConfig(target_modules=["c_fc"]))
    with pytest.raises(ValueError, match="BEFT cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), BeftConfig(target_modules=["emb"]))
    with pytest.raises(ValueError, match="no default target_modules"):
        fastpeft.get_peft_model(models.make_gpt2(), BeftConfig(task_type="CAUSAL_LM"))
    model = fastpeft.get_peft_model(models.make_mlp(), BeftConfig(target_modules=["lin0"]))
    assert isinstance(model.base_model, BeftModel)


def test_bf16_base_like_hf():
    """fp32 vectors on a bf16 base: added in fp32 and rounded to bf16, as HF PEFT."""
    oracle_helpers.assert_bf16_base_like_hf(TABLE, "mlp_randn_save_head")


def test_low_cpu_mem_usage_load(tmp_path):
    model = build(fastpeft, "mlp_two")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), inputs("mlp_two")), models.forward(model, inputs("mlp_two")), "meta")
