"""LoRA dropout in training mode on nn.Conv1d / Conv2d (grouped too) / Conv3d and nn.MultiheadAttention,
against HF PEFT 0.21.2: the same perturbed adapter in both libraries (HF PEFT's tensors handed to fastpeft
through the state-dict API, every key used), torch seeded right before each library's forward, so both draw
the same masks: equal training outputs and gradients for several seeds.

Convolutions drop the LoRA branch's input (`B(A(dropout(x)))`); the draws must change the outputs from one
seed to the next (else the check could not see dropout skipped). HF PEFT's MultiheadAttention adds its LoRA
deltas to the weights for the forward, so lora_dropout draws nothing there: fastpeft must not draw either;
with the attention's own dropout switched on, both libraries draw the same attention masks.
"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft

import models
from oracle_helpers import (
    CaseTable,
    assert_dropout_draws_like_hf,
    assert_same_training_step,
    same_adapter_pair,
    training_step,
)

P = 0.5
ATOL = 1e-6
SEEDS = (0, 1, 2)

CASES = {
    "conv1d": ("conv1d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=8, lora_dropout=P)),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=4, lora_alpha=8, lora_dropout=P)),
    "conv3d": ("conv3d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=8, lora_dropout=P)),
    "mha": ("mha", dict(target_modules=["mha"], r=4, lora_alpha=8, lora_dropout=P)),
}
TABLE = CaseTable(CASES, fastpeft.LoraConfig, peft.LoraConfig, scale=0.3, init_seed=0)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def pair(case):
    """(fastpeft, HF PEFT) models holding HF PEFT's perturbed adapter."""
    theirs, ours = same_adapter_pair(TABLE, case)
    return ours, theirs


def dropout_modules(model) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if ".lora_dropout." in n]


@pytest.mark.parametrize("case", ["conv1d", "conv2d", "conv3d"])
def test_conv_dropout_draws_like_hf(case):
    ours, theirs = pair(case)
    dropouts = dropout_modules(ours)
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.p == P for m in dropouts)
    x = TABLE.inputs(case)
    assert_dropout_draws_like_hf(ours, theirs, x, close, SEEDS)
    # the draws act on the LoRA branch only: the training output is neither the eval output nor the base's
    out, grads = training_step(ours, x, SEEDS[0])
    eval_out = models.forward(ours.eval(), x)
    assert (out - eval_out).abs().max() > 100 * ATOL, "dropout changed nothing"
    base_out = models.forward(TABLE.base(case), x)
    assert (eval_out - base_out).abs().max() > 100 * ATOL, "the adapter changes nothing"
    assert any("lora_A" in n and g.abs().max() > 1e-4 for n, g in grads.items())


def test_conv_dropout_module_sees_the_lora_input_only():
    """A conv layer's dropout module receives the layer input, once per forward, in training mode only."""
    ours, _ = pair("conv2d")
    layer = ours.base_model.model.conv0
    seen = []
    dropout = layer.lora_dropout["default"]
    hook = dropout.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = TABLE.inputs("conv2d")
    try:
        training_step(ours, x, 0)
        assert len(seen) == 1 and torch.equal(seen[0], x)
    finally:
        hook.remove()


def test_mha_lora_dropout_draws_nothing_like_hf():
    """HF PEFT merges MultiheadAttention's LoRA into the weights for each forward: lora_dropout has no effect
    in training mode, the same outputs for every seed, equal to the eval-mode ones; gradients as HF PEFT's."""
    ours, theirs = pair("mha")
    x = TABLE.inputs("mha")
    expected = models.forward(theirs.eval(), x)
    base_out = models.forward(TABLE.base("mha"), x)
    assert (expected - base_out).abs().max() > 100 * ATOL, "the adapter changes nothing"
    for seed in SEEDS:
        out, grads = assert_same_training_step(ours, theirs, x, close, seed)
        close(out, expected, f"training output, seed {seed}")
        assert any("lora_A" in n and g.abs().max() > 1e-4 for n, g in grads.items())
        out_proj = [g for n, g in grads.items() if "out_proj" in n and "lora_B" in n]
        assert out_proj and max(g.abs().max() for g in out_proj) > 1e-4


def test_mha_attention_dropout_draws_like_hf():
    """With the attention's own dropout on (lora_dropout too), both libraries draw the same masks."""
    ours, theirs = pair("mha")
    for model in (ours, theirs):
        model.get_base_model().mha.get_base_layer().dropout = 0.3
    assert_dropout_draws_like_hf(ours, theirs, TABLE.inputs("mha"), close, SEEDS)
