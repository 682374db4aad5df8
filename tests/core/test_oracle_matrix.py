"""HF PEFT as the oracle for every row of the contract matrix (tests/cases.py), whatever the method.

For each row: an adapter trained away from its init in HF PEFT loads in fastpeft with the same outputs, and
the reverse; the files fastpeft writes hold HF PEFT's keys, shapes and dtypes; one SGD step taken in both
libraries on the same loss gives the same gradients (compared under file keys) and the same outputs
afterwards. Method files test what is specific to a method.

Tolerances are a few times the largest difference measured between the libraries (outputs 2.4e-7,
dora-embedding; gradients 9e-8, randlora-mlp; most rows are bitwise equal), and every row's adapter moves
the outputs, and its gradients, by at least EFFECT tolerances, so that an adapter loaded or trained wrong
cannot pass.
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from oracle_rows import ORACLE_ROWS, row_outputs, trained_row

from models import MODELS

ATOL = RTOL = 1e-6  # outputs
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5
EFFECT = 100


def assert_same_outputs(actual, expected, case) -> None:
    """`actual` equals `expected` (an adapted model's outputs) within the tolerance, and the adapter moves
    `expected` away from the base model's outputs by at least EFFECT tolerances."""
    tolerance = ATOL + RTOL * expected.abs().max().item()
    effect = (expected - row_outputs(MODELS[case.model][0](), case)).abs().max().item()
    assert effect >= EFFECT * tolerance, f"the adapter's effect {effect:.2e} < {EFFECT} x {tolerance:.1e}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ORACLE_ROWS, ids=lambda c: c.id)
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    theirs = trained_row(peft, case)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path)).eval()
    assert_same_outputs(row_outputs(ours, case), row_outputs(theirs, case), case)


@pytest.mark.parametrize("case", ORACLE_ROWS, ids=lambda c: c.id)
def test_fastpeft_adapter_loads_in_hf_with_hf_keys(case, tmp_path):
    ours = trained_row(fastpeft, case)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path / "ours")).eval()
    assert_same_outputs(row_outputs(theirs, case), row_outputs(ours, case), case)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours_sd = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    hf_sd = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    assert sorted(ours_sd) == sorted(hf_sd)
    for key, value in hf_sd.items():
        assert (ours_sd[key].shape, ours_sd[key].dtype) == (value.shape, value.dtype), key


def _sgd_step(model, case) -> None:
    model.train()
    inputs = MODELS[case.model][1]()
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    (out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()


def file_gradients(lib, model) -> dict[str, torch.Tensor]:
    """The gradients under the adapter's file keys (the same in both libraries, unlike in-memory names): each
    trainable tensor's data is swapped for its gradient while the library builds its adapter state dict."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kept = [p.data for p in trainable]
    try:
        for p in trainable:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        return {k: v.clone() for k, v in lib.get_peft_model_state_dict(model).items()}
    finally:
        for p, data in zip(trainable, kept):
            p.data = data


@pytest.mark.parametrize("case", [c for c in ORACLE_ROWS if c.hf_same_gradients], ids=lambda c: c.id)
def test_one_training_step_matches_hf(case, tmp_path):
    theirs = trained_row(peft, case)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path), is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(MODELS[case.model][0](), str(tmp_path), is_trainable=True)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    grads = []
    for lib, model in ((fastpeft, ours), (peft, theirs)):
        torch.manual_seed(0)
        _sgd_step(model, case)
        grads.append(file_gradients(lib, model))
    assert sorted(grads[0]) == sorted(grads[1])
    largest = max(g.abs().max().item() for g in grads[1].values())
    assert largest >= EFFECT * GRAD_ATOL, f"largest gradient {largest:.2e}: < {EFFECT} x {GRAD_ATOL}"
    for key, value in grads[1].items():
        torch.testing.assert_close(grads[0][key], value, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=key)
    torch.testing.assert_close(row_outputs(ours, case), row_outputs(theirs, case), atol=ATOL, rtol=RTOL)
