"""Shared check for init schemes that rewrite the base (PiSSA-like): saving with
`path_initial_model_for_weight_conversion` gives HF PEFT's files, and they apply to the original base
model."""

from __future__ import annotations

import peft
import torch
from safetensors.torch import load_file

import fastpeft

import models


def adapter_and_base_tensors(model) -> dict[str, torch.Tensor]:
    """Adapter factors and (residual) base weights of the targets."""
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n or "base_layer.weight" in n}


def assert_same_tensors(fp, hf, atol=1e-5) -> None:
    fp_t, hf_t = adapter_and_base_tensors(fp), adapter_and_base_tensors(hf)
    assert sorted(fp_t) == sorted(hf_t)
    for key in hf_t:
        torch.testing.assert_close(fp_t[key], hf_t[key], atol=atol, rtol=1e-5, msg=key)


def assert_bitwise_same(fp, hf, autocast: bool) -> None:
    """Same dtypes and bits; lora_A in float32 with adapter autocast, in the (bf16) base dtype without."""
    fp_t, hf_t = adapter_and_base_tensors(fp), adapter_and_base_tensors(hf)
    for key in hf_t:
        assert fp_t[key].dtype == hf_t[key].dtype, key
        assert torch.equal(fp_t[key], hf_t[key]), key
    assert (fp_t["base_model.model.lin0.lora_A.default.weight"].dtype
            == (torch.float32 if autocast else torch.bfloat16))


def assert_converted_like_hf(fp, hf, tmp_path, factory, inputs, r_alpha: tuple[int, int]) -> None:
    """`fp` was saved to tmp_path/"init" (copied to "init_hf") right after get_peft_model and then trained;
    `hf` is the same untrained adapter in HF PEFT. Both convert the trained weights; files, config and outputs
    must agree."""
    trained = models.forward(fp, inputs)
    fp.save_pretrained(str(tmp_path / "trained"))
    fp.save_pretrained(str(tmp_path / "conv"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft.set_peft_model_state_dict(hf, load_file(str(tmp_path / "trained" / "adapter_model.safetensors")))
    hf.save_pretrained(str(tmp_path / "conv_hf"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init_hf"))

    fp_sd = load_file(str(tmp_path / "conv" / "adapter_model.safetensors"))
    hf_sd = load_file(str(tmp_path / "conv_hf" / "adapter_model.safetensors"))
    assert sorted(fp_sd) == sorted(hf_sd)
    for key in hf_sd:
        torch.testing.assert_close(fp_sd[key], hf_sd[key], atol=1e-5, rtol=1e-5, msg=key)
    fp_cfg = fastpeft.LoraConfig.from_pretrained(str(tmp_path / "conv"))
    hf_cfg = peft.LoraConfig.from_pretrained(str(tmp_path / "conv_hf"))
    assert (fp_cfg.r, fp_cfg.lora_alpha, fp_cfg.init_lora_weights) == (hf_cfg.r, hf_cfg.lora_alpha, True)
    assert (fp_cfg.r, fp_cfg.lora_alpha) == r_alpha
    for lib in (fastpeft, peft):  # plain LoRA on the ORIGINAL base model gives the trained outputs
        loaded = lib.PeftModel.from_pretrained(factory(), str(tmp_path / "conv"))
        torch.testing.assert_close(models.forward(loaded, inputs), trained, atol=1e-4, rtol=1e-4)
