"""LN tuning against HF PEFT: files both ways, gradients, merging (module swap), several adapters, dtypes,
errors. (Rows ln-tuning-* of tests/cases.py also run through tests/core/test_oracle_matrix.py and
tests/core/test_contract.py.)"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.ln_tuning import LNTuningConfig, LNTuningLayer

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("ln-tuning-mlp"),  # any module type can be copied, not only norms
    "llama": table_row("ln-tuning-llama"),  # default targets: input / post_attention norms, norm
    "gpt2": table_row("ln-tuning-gpt2"),  # ln_1, ln_2, ln_f
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM")),  # layer_norm, final_layer_norm
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    "llama_layer1": ("llama", dict(task_type="CAUSAL_LM", target_modules=".*layers\\.1\\..*layernorm")),
}
TABLE = oh.CaseTable(CASES, LNTuningConfig, peft.LNTuningConfig, scale=0.1)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["bert"])  # (mlp, llama, gpt2: one SGD step in the oracle matrix)
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, inputs(case), close, "ln_tuning_layers")


@pytest.mark.parametrize("case", ["mlp", "llama", "t5"])
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    x = inputs(case)
    hf.merge_adapter()
    fp.merge_adapter()
    with hf.disable_adapter(), fp.disable_adapter():  # disabling unmerges (as HF PEFT)
        close(models.forward(fp, x), models.forward(base(case), x), "disabled")
    oh.assert_merges_like_hf(fp, hf, x, close, safe_merge=True)


def _two_adapters(lib):
    model = build(lib, "llama")
    model.add_adapter("other", config(lib, "llama"))
    return models.perturb(model, 5, 0.1, wanted=lambda name: ".other." in name).eval()


def test_two_adapters_switch_merge_delete_like_hf():
    hf, fp = _two_adapters(peft), _two_adapters(fastpeft)
    x = inputs("llama")
    for name in ("other", "default"):
        hf.set_adapter(name)
        fp.set_adapter(name)
        close(models.forward(fp, x), models.forward(hf, x), f"adapter {name}")
    fp.base_model.merge_adapter(["other"])
    hf.base_model.merge_adapter(["other"])
    close(models.forward(fp, x), models.forward(hf, x), "other merged, default active")
    fp.base_model.merge_adapter(["default"])  # swaps 'other' out first: one merged adapter at a time
    hf.base_model.merge_adapter(["default"])
    close(models.forward(fp, x), models.forward(hf, x), "default merged")
    fp.base_model.unmerge_adapter()
    hf.base_model.unmerge_adapter()
    fp.delete_adapter("other")
    hf.delete_adapter("other")
    close(models.forward(fp, x), models.forward(hf, x), "after delete")
    assert not any(".other" in k for k in fp.state_dict())


def test_adapter_missing_on_a_layer_runs_the_base_there():
    """(HF PEFT raises a KeyError here; fastpeft runs the base module where the active adapter has no
    copy.)"""
    fp = build(fastpeft, "llama")
    fp.add_adapter("other", config(fastpeft, "llama", target_modules=["post_attention_layernorm"]))
    fp.set_adapter("other")
    with torch.no_grad():
        (fp.base_model.model.model.layers[0].post_attention_layernorm
         .ln_tuning_layers["other"].weight.fill_(2.0))
    ref = build(fastpeft, "llama")
    with torch.no_grad():
        for layer in ref.base_model.model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.ln_tuning_layers["default"].load_state_dict(norm.base_layer.state_dict())
        ref.base_model.model.model.norm.ln_tuning_layers["default"].load_state_dict(
            ref.base_model.model.model.norm.base_layer.state_dict())
        (ref.base_model.model.model.layers[0].post_attention_layernorm
         .ln_tuning_layers["default"].weight.fill_(2.0))
    close(models.forward(fp, inputs("llama")), models.forward(ref, inputs("llama")), "partial adapter")


def test_one_adapter_at_a_time():
    fp = _two_adapters(fastpeft)
    fp.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        models.forward(fp, inputs("llama"))
    with pytest.raises(ValueError, match="one adapter at a time"):
        fp.base_model.merge_adapter(["default", "other"])


def test_copies_keep_the_base_dtype_like_hf():
    """LN tuning copies modules: no fp32 autocast of the copies, as HF PEFT."""
    fp = fastpeft.get_peft_model(base("llama").to(torch.bfloat16), config(fastpeft, "llama"))
    hf = peft.get_peft_model(base("llama").to(torch.bfloat16), config(peft, "llama"))
    hf_dtypes = {n: p.dtype for n, p in hf.named_parameters()}
    assert {n: p.dtype for n, p in fp.named_parameters()} == hf_dtypes
    assert set(hf_dtypes.values()) == {torch.bfloat16}
    models.forward(fp, inputs("llama"))


def test_unknown_model_type_needs_target_modules():
    model = base("mlp")
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(model, LNTuningConfig())
    assert not any(isinstance(m, LNTuningLayer) for m in model.modules())


def test_bad_target_type_is_refused():
    with pytest.raises(ValueError, match="target_modules"):
        LNTuningConfig(target_modules=3)
