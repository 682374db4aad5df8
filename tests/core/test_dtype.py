"""Adapter dtype policy on half-precision bases, checked against HF PEFT (property 10)."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from state_helpers import assert_holds_file

from models import llama_inputs, make_llama


def _build(lib, dtype, autocast):
    base = make_llama().to(dtype)
    config = lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                            init_lora_weights=False)
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


# atol: one ulp of the dtype near the logits' size (0.33); measured: bitwise equal; the adapter's effect: 0.4
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-3), (torch.float16, 2.5e-4)], ids=str)
def test_half_base_forward_keeps_output_dtype_and_matches_hf(dtype, atol, tmp_path):
    theirs = _build(peft, dtype, True).eval()
    theirs.save_pretrained(tmp_path)
    base = make_llama().to(dtype)
    torch.manual_seed(1)  # fastpeft's fresh adapter starts from other values than the saved one
    ours = fastpeft.PeftModel.from_pretrained(base, tmp_path)
    assert_holds_file(fastpeft, ours, tmp_path)
    inputs = llama_inputs()
    with torch.no_grad():
        out_ours, out_theirs = ours(**inputs).logits, theirs(**inputs).logits
        with theirs.disable_adapter():
            assert (out_theirs - theirs(**inputs).logits).abs().max() > 100 * atol
    assert out_ours.dtype == dtype
    torch.testing.assert_close(out_ours.float(), out_theirs.float(), atol=atol, rtol=0)


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
