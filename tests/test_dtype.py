"""Adapter dtype policy on half-precision bases, checked against HF PEFT (property 10)."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft

from models import llama_inputs, make_llama


def _build(lib, dtype, autocast):
    base = make_llama().to(dtype)
    config = lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    return lib.get_peft_model(base, config, autocast_adapter_dtype=autocast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_adapter_dtypes_match_hf(dtype, autocast, tmp_path):
    ours, theirs = _build(fastpeft, dtype, autocast), _build(peft, dtype, autocast)
    dtypes = {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad}
    assert dtypes == {n: p.dtype for n, p in theirs.named_parameters() if p.requires_grad}
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_files = fastpeft.load_peft_weights(str(tmp_path / "ours"))
    theirs_files = fastpeft.load_peft_weights(str(tmp_path / "theirs"))
    assert {k: v.dtype for k, v in ours_files.items()} == {k: v.dtype for k, v in theirs_files.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_base_forward_keeps_output_dtype_and_matches_hf(dtype, tmp_path):
    theirs = _build(peft, dtype, True)
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.PeftModel.from_pretrained(make_llama().to(dtype), tmp_path)
    inputs = llama_inputs()
    with torch.no_grad():
        out_ours, out_theirs = ours(**inputs).logits, theirs.eval()(**inputs).logits
    assert out_ours.dtype == dtype
    assert torch.allclose(out_ours.float(), out_theirs.float(), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_half_base_fresh_adapter_equals_hf_bitwise(dtype, autocast):
    """HF PEFT builds adapters in the base dtype before widening them: the same seed gives the same values."""
    torch.manual_seed(0)
    ours = _build(fastpeft, dtype, autocast)
    torch.manual_seed(0)
    theirs = _build(peft, dtype, autocast)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    other = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(other)
    for name, param in mine.items():
        assert param.dtype == other[name].dtype and torch.equal(param, other[name]), name
