"""DoRA's one-node Linear output (variants/dora_fused.py) against the composed ops and HF PEFT: outputs,
gradients (A, B, magnitude, input, trainable base bias) and weights after AdamW steps, fp32 and bf16."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.lora.variants import dora, dora_fused

import models


class Stack(nn.Module):
    """Linears with and without bias, 3-D input (batch, tokens, features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l0 = nn.Linear(16, 24)
        self.l1 = nn.Linear(24, 12, bias=False)
        self.l2 = nn.Linear(12, 8)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


def stack_inputs():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


CASES = {
    "stack": (Stack, stack_inputs, dict(target_modules=["l0", "l1", "l2"], r=4, lora_alpha=8)),
    "gpt2_conv1d": (models.make_conv1d_gpt2, models.conv1d_gpt2_inputs,
                    dict(target_modules=["c_fc", "c_proj"], r=4, fan_in_fan_out=True)),
    "llama": (models.make_llama, models.llama_inputs,
              dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)),
}


def build(lib, case, dtype=torch.float32, **extra):
    factory, _, kw = CASES[case]
    model = lib.get_peft_model(factory(), lib.LoraConfig(**kw, use_dora=True, **extra))
    return models.perturb(model, 0, 0.1).to(dtype).train()


def run(model, x, fused=True):
    dora.FUSED = fused
    try:
        out = model(**x) if isinstance(x, dict) else model(x)
    finally:
        dora.FUSED = True
    return out.logits if hasattr(out, "logits") else out


def steps(model, case, n=3, fused=True, dtype=torch.float32):
    """n AdamW steps on a mean-square loss: the outputs and gradients of every step, the final weights."""
    x = CASES[case][1]()
    x = x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    record = []
    for i in range(n):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(100 + i)  # the same dropout masks in every library, fresh ones each step
        out = run(model, x, fused)
        (out.float() ** 2).mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        record.append((out.detach().clone(), grads))
        opt.step()
    return record, {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def compare(got, want, atol, rtol):
    (rec_a, final_a), (rec_b, final_b) = got, want
    assert set(final_a) == set(final_b) and any("magnitude" in k for k in final_a)
    for i, ((out_a, g_a), (out_b, g_b)) in enumerate(zip(rec_a, rec_b)):
        torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol, msg=lambda m, i=i: f"step {i}: {m}")
        for k in g_b:
            torch.testing.assert_close(g_a[k], g_b[k], atol=atol, rtol=rtol,
                                       msg=lambda m, i=i, k=k: f"step {i} grad {k}: {m}")
    for k in final_b:
        torch.testing.assert_close(final_a[k], final_b[k], atol=atol, rtol=rtol,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(autouse=True)
def one_node_form(monkeypatch):
    """These tests are about the one-node forms: the one-GEMM form (dora_scaled.py) stays off."""
    monkeypatch.setattr(dora, "TOKENS_PER_ROW", float("inf"))


class InplaceStack(nn.Module):
    """Linears whose outputs the model changes in place (scaled, ReLU(inplace=True) as some vision MLPs, a
    shift)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1 = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.l1(torch.relu_(self.l0(x).mul_(1.5))).add_(0.5)


def grads_of(model, x):
    """Gradients of a mean-square loss (HF PEFT's magnitude key names), dropout masks seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    (run(model, x) ** 2).mean().backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def inplace_grads(lib, dropout=0.0):
    config = lib.LoraConfig(target_modules=["l0", "l1"], r=4, use_dora=True, lora_dropout=dropout)
    model = models.perturb(lib.get_peft_model(InplaceStack(), config), 0, 0.1).train()
    return grads_of(model, stack_inputs())


def node_calls(monkeypatch, node) -> list:
    """A list that gets an entry each time the autograd node `node` runs."""
    calls = []
    original = node.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(node, "apply", counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """How often the fused node (no dropout acting) ran."""
    return node_calls(monkeypatch, dora_fused.DoraLinearOutput)


@pytest.fixture
def dropout_calls(monkeypatch):
    """How often the fused node with dropout ran."""
    return node_calls(monkeypatch, dora_fused.DoraDropoutOutput)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_composed_over_training_steps(case, fused_calls):
    model = build(fastpeft, case)
    reference = copy.deepcopy(model)
    fused = steps(model, case)
    assert fused_calls, "the fused node was not used"
    calls = len(fused_calls)
    compare(fused, steps(reference, case, fused=False), atol=1e-6, rtol=1e-5)
    assert len(fused_calls) == calls, "the composed reference used the fused node"


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_hf_over_training_steps(case, fused_calls):
    got = steps(build(fastpeft, case), case)
    assert fused_calls
    want = steps(build(peft, case), case)
    compare(got, want, atol=1e-5, rtol=1e-4)
    base = run(CASES[case][0]().train(), CASES[case][1]())
    assert (got[0][0][0] - base).abs().max() > 1e-2  # the adapter's effect dwarfs the tolerance


def test_trainable_base_bias_gradient_matches_hf(fused_calls):
    """bias='all': the base biases train; the node adds (1 - m/n) * sum_t g to their gradient."""
    got = steps(build(fastpeft, "stack", bias="all"), "stack")
    assert fused_calls and "base_model.model.l0.base_layer.bias" in got[1]
    compare(got, steps(build(peft, "stack", bias="all"), "stack"), atol=1e-5, rtol=1e-4)


def check_bf16_path(case: str, calls: list) -> None:
    """Two bf16 AdamW steps through the path whose node counter is `calls` (it must run) equal the composed
    ops and HF PEFT within bf16's rounding."""
    bf16 = torch.bfloat16
    got = steps(build(fastpeft, case, bf16), case, n=2, dtype=bf16)
    assert calls
    composed = steps(build(fastpeft, case, bf16), case, n=2, fused=False, dtype=bf16)
    compare(got, composed, atol=2e-2, rtol=2e-2)
    compare(got, steps(build(peft, case, bf16), case, n=2, dtype=bf16), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["stack", "llama"])
def test_bf16_fused_equals_composed_and_hf(case, fused_calls):
    check_bf16_path(case, fused_calls)


@pytest.mark.parametrize("case", ["stack", "llama"])
def test_dropout_node_equals_composed_and_hf_over_training_steps(case, fused_calls, dropout_calls):
    """With dropout acting, HF PEFT adds (m/n - 1) dropout(x) W^T + (m/n) s B A dropout(x): the dropout node
    draws the same masks (same seed) and gives the same outputs, gradients and weights after AdamW steps."""
    fused = steps(build(fastpeft, case, lora_dropout=0.3), case)
    assert dropout_calls and not fused_calls
    calls = len(dropout_calls)
    compare(fused, steps(build(fastpeft, case, lora_dropout=0.3), case, fused=False), atol=1e-6, rtol=1e-5)
    assert len(dropout_calls) == calls
    compare(fused, steps(build(peft, case, lora_dropout=0.3), case), atol=1e-5, rtol=1e-4)
    no_dropout = steps(build(fastpeft, case), case, n=1)
    assert (fused[0][0][0] - no_dropout[0][0][0]).abs().max() > 1e-2  # the masks matter


def test_dropout_node_in_eval_gives_way_to_the_plain_node(fused_calls, dropout_calls):
    fp, hf = build(fastpeft, "stack", lora_dropout=0.3).eval(), build(peft, "stack", lora_dropout=0.3).eval()
    x = stack_inputs()
    torch.testing.assert_close(run(fp, x), run(hf, x), atol=1e-5, rtol=1e-4)
    assert fused_calls and not dropout_calls


def test_adapters_added_and_deleted_between_steps(fused_calls):
    """Two DoRA adapters and a plain LoRA one active at once (each DoRA node sees the output so far), then
    one deleted: the same as the composed ops and as HF PEFT throughout."""
    models_ = {}
    for key, lib in (("fp", fastpeft), ("ref", fastpeft), ("hf", peft)):
        model = build(lib, "stack")
        model.add_adapter("second", lib.LoraConfig(target_modules=["l0", "l2"], r=2, use_dora=True))
        model.add_adapter("plain", lib.LoraConfig(target_modules=["l1", "l2"], r=2))
        models.perturb(model, 1, 0.1, wanted=lambda n: "second" in n or "plain" in n)
        model.base_model.set_adapter(["default", "second", "plain"])
        models_[key] = model
    x = stack_inputs()
    outs = {k: run(m, x, fused=k != "ref") for k, m in models_.items()}
    assert fused_calls
    torch.testing.assert_close(outs["fp"], outs["ref"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs["fp"], outs["hf"], atol=1e-5, rtol=1e-4)
    for model in models_.values():
        model.delete_adapter("second")
        model.base_model.set_adapter(["default", "plain"])
    got = steps(models_["fp"], "stack", n=2)
    compare(got, steps(models_["ref"], "stack", n=2, fused=False), atol=1e-6, rtol=1e-5)
    compare(got, steps(models_["hf"], "stack", n=2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_norm_widens_row_blocks_exactly(dtype):
    """The norm of a half-precision W is taken in float32 from row blocks (300 rows: a partial last block):
    bit for bit what widening all of W first gives."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 40, generator=g).to(dtype)
    b, a = torch.randn(300, 4, generator=g).to(dtype), torch.randn(4, 40, generator=g).to(dtype)
    w_sq = w.float().square().sum(1)
    want = dora.row_norm(w.float(), b, a, 0.7, w_sq)
    assert torch.equal(dora.row_norm(w, b, a, 0.7, w_sq), want)
    assert torch.equal(dora._widened_product(w, a.float().T), w.float() @ a.float().T)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_output_changed_in_place_as_hf(dropout, fused_calls, dropout_calls):
    """The nodes' outputs are not views of their 2-D results: the model may change them in place."""
    got, want = inplace_grads(fastpeft, dropout), inplace_grads(peft, dropout)
    assert (dropout_calls if dropout else fused_calls) and set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
