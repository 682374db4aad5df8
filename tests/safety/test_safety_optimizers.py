"""Optimizer side of frozen adapters: an adapter loaded frozen (`is_trainable=False`, the default) trains
nothing.

HF PEFT 0.21.2 (the oracle here) builds LoRA+ / LoRA-FA optimizers over zero trainable parameters and, with
`enable_input_require_grads` on (gradient checkpointing, k-bit preparation), even runs backward and `step()`
on a hand-built `AdamW(model.parameters())` without changing a weight. fastpeft refuses the optimizer builders
with `AdapterStateError`, and a hand-built optimizer is caught at the first training forward.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_lorafa_optimizer as hf_lorafa
from peft.optimizers import create_loraplus_optimizer as hf_loraplus

import fastpeft
from fastpeft.errors import AdapterStateError
from fastpeft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

import models

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def saved(tmp_path):
    """An HF PEFT LoRA adapter on the tiny Llama (non-zero B), saved to `tmp_path / 'hf'`."""
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    peft.get_peft_model(models.make_llama(), config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _load(lib, folder, **kwargs):
    return lib.PeftModel.from_pretrained(models.make_llama(), str(folder), **kwargs)


def _loraplus(builder, model):
    return builder(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)


def _lorafa(builder, model):
    return builder(model, r=4, lora_alpha=8, lr=1e-3)


def _trained(optimizer) -> int:
    return sum(p.requires_grad for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("build", [_loraplus, _lorafa], ids=["loraplus", "lorafa"])
def test_optimizer_builders_refuse_a_frozen_adapter(saved, build):
    hf_builder = hf_loraplus if build is _loraplus else hf_lorafa
    ours_builder = create_loraplus_optimizer if build is _loraplus else create_lorafa_optimizer
    # HF PEFT: an optimizer over nothing, silently
    assert _trained(build(hf_builder, _load(peft, saved))) == 0
    with pytest.raises(AdapterStateError, match="no trainable parameters.*is_trainable=True"):
        build(ours_builder, _load(fastpeft, saved))
    theirs = build(hf_builder, _load(peft, saved, is_trainable=True))
    ours = build(ours_builder, _load(fastpeft, saved, is_trainable=True))
    assert [len(g["params"]) for g in ours.param_groups] == [len(g["params"]) for g in theirs.param_groups]
    assert _trained(ours) == _trained(theirs) > 0


def test_lorafa_refusal_changes_nothing_when_only_a_factors_train(saved):
    """LoRA-FA freezes A: a model whose only trainable tensors are A factors would train nothing. The check
    runs before the freezing, so the refused call leaves every requires_grad flag as it was."""
    ours = _load(fastpeft, saved, is_trainable=True)
    for name, param in ours.named_parameters():
        param.requires_grad_("lora_A" in name)
    before = {n: p.requires_grad for n, p in ours.named_parameters()}
    with pytest.raises(AdapterStateError, match="besides the LoRA A factors"):
        create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-3)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == before
    create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)  # LoRA+ trains A: fine


def test_hand_built_optimizer_over_a_frozen_adapter_stops_at_the_training_forward(saved):
    """torch accepts `AdamW(model.parameters())` when nothing requires grad. With input grads enabled the loss
    still requires grad, so HF PEFT runs backward and step() and the adapter silently stays as loaded."""
    inputs = models.llama_inputs()
    theirs = _load(peft, saved)
    theirs.get_base_model().enable_input_require_grads()
    before = {n: p.detach().clone() for n, p in theirs.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=0.1)
    theirs.train()
    theirs(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in theirs.named_parameters() if "lora_" in n)

    ours = _load(fastpeft, saved)
    ours.get_base_model().enable_input_require_grads()
    torch.optim.AdamW(ours.parameters(), lr=0.1)  # torch's own check passes: parameters exist
    ours.train()
    with torch.no_grad():  # train-mode inference is still allowed
        expected = theirs(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(AdapterStateError, match="0 trainable parameters"):
        ours(**inputs, labels=inputs["input_ids"]).loss.backward()
