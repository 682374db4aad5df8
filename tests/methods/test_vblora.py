"""VB-LoRA against HF PEFT 0.21.2: seeded init, the shared vector bank's file key, full and top-k-only files
both ways, outputs, gradients, merging, several adapters, mixed batches, refusals."""

from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.methods.vblora import VBLoRAConfig, VBLoRAModel

import models
import oracle_helpers
from cases import table_row

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": table_row("vblora-mlp"),
    "mlp_topk": ("mlp", dict(target_modules=["lin0", "lin1"], r=3, vector_length=5, num_vectors=12, topk=3,
                             save_only_topk_weights=True, bias="vblora_only")),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], r=2, vector_length=2,
                                        num_vectors=8, init_vector_bank_bound=0.5, init_logits_std=1.0)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4, vector_length=8, num_vectors=12)),
    "gpt2_topk_int16": ("gpt2", dict(task_type="CAUSAL_LM", r=2, vector_length=16, num_vectors=300,
                                     save_only_topk_weights=True)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=2, vector_length=8, num_vectors=10, bias="all")),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=2, vector_length=8, num_vectors=10, vblora_dropout=0.1)),
}
# the global RNG in the same state for both libraries before get_peft_model (bank and logits are drawn from
# it)
TABLE = oracle_helpers.CaseTable(CASES, VBLoRAConfig, peft.VBLoRAConfig, scale=0.3, init_seed=7)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_seeded_init_matches_hf(case):
    """Same seeds: the same bank and logits (the bank drawn as HF draws it), the same trainable names."""
    hf, fp = TABLE.fresh(peft, case), TABLE.fresh(fastpeft, case)
    fp_sd = fp.state_dict()
    oracle_helpers.assert_same_state_dict(fp_sd, hf.state_dict())
    assert "base_model.vblora_vector_bank.default" in fp_sd
    trainable = [[n for n, p in m.named_parameters() if p.requires_grad] for m in (hf, fp)]
    assert trainable[0] == trainable[1]
    assert hf.get_nb_trainable_parameters() == fp.get_nb_trainable_parameters()
    bank = fp.base_model.vblora_vector_bank["default"]
    assert all(m.vblora_vector_bank["default"] is bank for m in fp.modules() if hasattr(m, "vblora_logits_A"))


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """Both libraries save the same file (bank once, full or top-k logits); each loads the other's."""
    hf, fp = build(peft, case), build(fastpeft, case)
    x = inputs(case)
    hf_out = models.forward(hf, x)
    oracle_helpers.assert_differs(hf_out, models.forward(base(case), x))
    close(models.forward(fp, x), hf_out, "fastpeft vs HF")
    # a top-k file loaded and saved again holds softmax(log(weights)): within 1e-6, in HF PEFT too
    exact = not CASES[case][1].get("save_only_topk_weights")
    oracle_helpers.assert_files_both_ways(hf, partial(base, case), x, tmp_path, close, exact=exact)
    fp.save_pretrained(str(tmp_path / "built"))
    oracle_helpers.assert_same_files(tmp_path / "built", tmp_path / "hf")
    assert "base_model.vblora_vector_bank" in load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    loaded_fp = fastpeft.PeftModel.from_pretrained(base(case), str(tmp_path / "hf"))
    loaded_hf = peft.PeftModel.from_pretrained(base(case), str(tmp_path / "built"))
    fp_state = loaded_fp.state_dict()
    # the same -inf pattern and log-weights after a top-k load
    for key, value in loaded_hf.state_dict().items():
        if "vblora_" in key:
            close(fp_state[key], value, f"loaded {key}")


def test_topk_loaded_adapter_refuses_training_like_hf(tmp_path):
    build(fastpeft, "mlp_topk").save_pretrained(str(tmp_path))
    x = inputs("mlp_topk")
    hf = peft.PeftModel.from_pretrained(base("mlp_topk"), str(tmp_path), is_trainable=True).train()
    fp = fastpeft.PeftModel.from_pretrained(base("mlp_topk"), str(tmp_path), is_trainable=True).train()
    with pytest.raises(RuntimeError):
        hf(x)
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        fp(x)


@pytest.mark.parametrize("case", ["mlp", "mlp_topk", "gpt2_topk_int16"])
def test_savable_parameter_counts_match_hf(case):
    hf, fp = build(peft, case), build(fastpeft, case)
    assert fp.base_model.get_nb_savable_parameters() == hf.base_model.get_nb_savable_parameters()


# (the "mlp" case is the contract row vblora-mlp: tests/core/test_oracle_matrix.py takes its training step)
@pytest.mark.parametrize("case", ["gpt2_conv1d", "bert"])
def test_training_step_gradients_match_hf(case):
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close,
                                            "vblora_vector_bank")


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case, bias="none"))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    oracle_helpers.assert_adapters_merge_like_hf(_two_adapters(fastpeft, case), _two_adapters(peft, case),
                                                 inputs(case), close)


def test_two_banks_disable_set_delete_and_mixed_batch_match_hf(tmp_path):
    hf, fp = _two_adapters(peft, "llama"), _two_adapters(fastpeft, "llama")
    assert set(fp.base_model.vblora_vector_bank) == {"default", "other"}
    fp.save_pretrained(str(tmp_path))
    other = load_file(str(tmp_path / "other" / "adapter_model.safetensors"))
    close(other["base_model.vblora_vector_bank"], hf.base_model.vblora_vector_bank["other"], "other's bank")
    x = inputs("llama")
    oracle_helpers.assert_adapter_switching_like_hf(fp, hf, x, models.forward(base("llama"), x), close)
    assert set(fp.base_model.vblora_vector_bank) == {"default"}


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="in_features=10 .* not divisible by vector_length=4"):
        fastpeft.get_peft_model(models.make_mlp(), VBLoRAConfig(target_modules=["lin0"], vector_length=4))
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), VBLoRAConfig(target_modules=["emb"], vector_length=2))
    with pytest.raises(ValueError, match="topk=5 exceeds num_vectors=4"):
        VBLoRAConfig(topk=5, num_vectors=4)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        VBLoRAConfig(r=0)
    model = fastpeft.get_peft_model(models.make_mlp(), VBLoRAConfig(target_modules=["lin1"], vector_length=4))
    assert isinstance(model.base_model, VBLoRAModel)
    oracle_helpers.assert_add_adapter_refused(  # a failed second adapter leaves no bank behind
        model, "bad", VBLoRAConfig(target_modules=["lin0", "lin1"], vector_length=4), "not divisible")
    assert set(model.base_model.vblora_vector_bank) == {"default"}


def test_topk_file_problems(tmp_path):
    """A top-k file missing a tensor is refused by name; whole logits under a top-k config load as in HF
    PEFT."""
    build(fastpeft, "mlp_topk").save_pretrained(str(tmp_path / "topk"))
    weights = load_file(str(tmp_path / "topk" / "adapter_model.safetensors"))
    key = "base_model.model.lin1.vblora_logits_B_topk_weights"
    save_file({k: v for k, v in weights.items() if k != key},
              str(tmp_path / "topk" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lacks.*lin1.vblora_logits_B_topk_weights"):
        fastpeft.PeftModel.from_pretrained(base("mlp_topk"), str(tmp_path / "topk"))
    build(peft, "mlp_topk", save_only_topk_weights=False).save_pretrained(str(tmp_path / "full"))
    oracle_helpers.rewrite_config(tmp_path / "full", save_only_topk_weights=True)
    x = inputs("mlp_topk")
    hf = peft.PeftModel.from_pretrained(base("mlp_topk"), str(tmp_path / "full")).eval()
    fp = fastpeft.PeftModel.from_pretrained(base("mlp_topk"), str(tmp_path / "full")).eval()
    close(models.forward(fp, x), models.forward(hf, x), "whole logits under a top-k config")
    close(models.forward(fp, x), models.forward(build(peft, "mlp_topk"), x), "as before saving")
