"""DoRA's Linear layer as one GEMM with the rescaled weight k (W + s B A) (variants/dora_scaled.py) against
the composed ops and HF PEFT: outputs, gradients (A, B, magnitude, input, trainable base bias), weights after
AdamW steps, fp32 and bf16; its fallbacks (output changed in place, zero magnitude) and where it gives way."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.lora.variants import dora, dora_fused, dora_scaled
from test_dora_fused import (
    CASES,
    build,
    check_bf16_path,
    compare,
    grads_of,
    inplace_grads,
    node_calls,
    run,
    stack_inputs,
    steps,
)

import models


@pytest.fixture
def scaled_calls(monkeypatch):
    """How often the one-GEMM node ran; it applies from any token count here (the tiny models' few rows)."""
    monkeypatch.setattr(dora, "TOKENS_PER_ROW", 0.0)
    return node_calls(monkeypatch, dora_scaled.DoraScaledOutput)


@pytest.fixture
def fused_calls(monkeypatch):
    return node_calls(monkeypatch, dora_fused.DoraLinearOutput)


@pytest.mark.parametrize("case", ["stack", "llama"])
def test_scaled_equals_composed_and_hf_over_training_steps(case, scaled_calls, fused_calls):
    model = build(fastpeft, case)
    reference = copy.deepcopy(model)
    got = steps(model, case)
    assert scaled_calls and not fused_calls, "every Linear DoRA layer takes the one-GEMM form"
    calls = len(scaled_calls)
    compare(got, steps(reference, case, fused=False), atol=1e-6, rtol=1e-5)
    assert len(scaled_calls) == calls, "the composed reference used the one-GEMM node"
    compare(got, steps(build(peft, case), case), atol=1e-5, rtol=1e-4)
    base = run(CASES[case][0]().train(), CASES[case][1]())
    assert (got[0][0][0] - base).abs().max() > 1e-2  # the adapter's effect dwarfs the tolerance


@pytest.mark.parametrize("case", ["stack", "llama"])
def test_bf16_scaled_equals_composed_and_hf(case, scaled_calls):
    check_bf16_path(case, scaled_calls)


def test_trainable_base_bias_gradient_matches_hf(scaled_calls):
    """bias='all': the bias enters k (W + s B A) x + bias with factor 1: its gradient is sum_t g."""
    got = steps(build(fastpeft, "stack", bias="all"), "stack")
    assert scaled_calls and "base_model.model.l0.base_layer.bias" in got[1]
    compare(got, steps(build(peft, "stack", bias="all"), "stack"), atol=1e-5, rtol=1e-4)


def test_output_changed_in_place_forms_x_w_again(scaled_calls):
    """The magnitude's gradient comes from the kept output; changed in place, x W^T is formed anew."""
    got, want = inplace_grads(fastpeft), inplace_grads(peft)
    assert scaled_calls
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_zero_magnitude_rows_give_hf_gradients(scaled_calls):
    """m_o = 0 (the output row switched off): the gradient of m_o cannot come from z / m: formed directly."""
    x = stack_inputs()
    grads = []
    for lib in (fastpeft, peft):
        model = build(lib, "stack")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:
                    p[::3] = 0
        grads.append(grads_of(model, x))
    assert scaled_calls
    for k in grads[1]:
        assert grads[0][k].isfinite().all()
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_gives_way_where_it_does_not_apply(scaled_calls, fused_calls, monkeypatch):
    """Conv1D (fan_in_fan_out), two active adapters on a layer, dropout acting, or fewer rows than
    TOKENS_PER_ROW * out: the one-node form (or the composed ops); in eval the dropout does not act."""
    run(build(fastpeft, "gpt2_conv1d"), CASES["gpt2_conv1d"][1]())
    assert not scaled_calls and fused_calls
    model = build(fastpeft, "stack")
    model.add_adapter("second", fastpeft.LoraConfig(target_modules=["l0", "l1", "l2"], r=2, use_dora=True))
    model.base_model.set_adapter(["default", "second"])
    run(model, stack_inputs())
    assert not scaled_calls
    dropped = build(fastpeft, "stack", lora_dropout=0.3)
    run(dropped, stack_inputs())
    assert not scaled_calls
    run(dropped.eval(), stack_inputs())
    assert len(scaled_calls) == 3
    monkeypatch.setattr(dora, "TOKENS_PER_ROW", 1.0)  # 10 rows: only l2 (8 outputs) qualifies
    run(build(fastpeft, "stack"), stack_inputs())
    assert len(scaled_calls) == 4


def test_adapter_deleted_then_scaled_steps_match_hf(scaled_calls):
    """Two DoRA adapters active (the one-node form), then one deleted: the one-GEMM form on the rest, equal to
    HF PEFT over AdamW steps."""
    built = {}
    for label, lib in (("fp", fastpeft), ("hf", peft)):
        model = build(lib, "stack")
        model.add_adapter("second", lib.LoraConfig(target_modules=["l0", "l2"], r=2, use_dora=True))
        models.perturb(model, 1, 0.1, wanted=lambda n: "second" in n)
        model.base_model.set_adapter(["default", "second"])
        built[label] = model
    x = stack_inputs()
    torch.testing.assert_close(run(built["fp"], x), run(built["hf"], x), atol=1e-5, rtol=1e-4)
    calls = len(scaled_calls)  # l1 has one adapter only
    for model in built.values():
        model.delete_adapter("second")
    got = steps(built["fp"], "stack", n=2)
    assert len(scaled_calls) > calls + 2
    compare(got, steps(built["hf"], "stack", n=2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_weight_and_norm(dtype):
    """Wk = k (W + s B A), k = m / n, n = ||W + s B A||_row against float64, within two roundings to dtype;
    n close to the factored norm dora.row_norm."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 40, generator=g).to(dtype)
    a, b, m = (torch.randn(*shape, generator=g).to(dtype) for shape in ((4, 40), (300, 4), (300,)))
    v = w.double() + 0.7 * (b.double() @ a.double())
    norm = v.norm(dim=1)
    wk, k, n = dora_scaled.scaled_weight(w, a, b, m, 0.7)
    eps = torch.finfo(dtype).eps
    assert wk.dtype == k.dtype == n.dtype == dtype
    torch.testing.assert_close(n.double(), norm, atol=0, rtol=eps)
    torch.testing.assert_close(k, m / n, atol=0, rtol=0)
    want = v * (m.double() / norm)[:, None]
    torch.testing.assert_close(wk.double(), want, atol=eps * want.abs().max(), rtol=3 * eps)
    torch.testing.assert_close(n.float(), dora.row_norm(w, b, a, 0.7).to(dtype).float(), atol=0, rtol=2 * eps)


def test_hooks_on_the_base_layer_still_run(scaled_calls):
    """A base Linear with a forward (pre-)hook keeps its own call (the hooks change its output / input)."""
    outs = []
    for lib in (fastpeft, peft):
        model = build(lib, "stack")
        model.base_model.model.l0.base_layer.register_forward_hook(lambda mod, args, out: out * 2)
        model.base_model.model.l1.base_layer.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        outs.append(run(model, stack_inputs()))
    assert len(scaled_calls) == 1  # l2 only
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_trained_base_weight_and_mixed_dtypes_give_way(scaled_calls):
    """A base weight that trains keeps its own GEMM (its gradient is HF PEFT's); float32 factors on a bf16
    base (autocast_adapter_dtype) keep HF PEFT's order of roundings."""
    got = []
    for lib in (fastpeft, peft):
        model = build(lib, "stack")
        model.base_model.model.l0.base_layer.weight.requires_grad_(True)
        got.append(steps(model, "stack", n=2))
    assert len(scaled_calls) == 4  # l1, l2 in two steps
    compare(*got, atol=1e-5, rtol=1e-4)
    outs = []
    for lib in (fastpeft, peft):
        base = CASES["stack"][0]().to(torch.bfloat16)
        model = lib.get_peft_model(base, lib.LoraConfig(**CASES["stack"][2], use_dora=True))
        assert model.base_model.model.l0.lora_A["default"].weight.dtype == torch.float32
        outs.append(run(models.perturb(model, 0, 0.1), stack_inputs().to(torch.bfloat16)))
    assert len(scaled_calls) == 4
    torch.testing.assert_close(outs[0], outs[1], atol=1e-2, rtol=1e-2)


def test_a_layer_class_with_its_own_base_forward_keeps_it(scaled_calls):
    model = build(fastpeft, "stack")
    layer = model.base_model.model.l2
    plain = type(layer)

    def shifted(self, x, *args, **kwargs):
        return plain.base_forward(self, x, *args, **kwargs) + 1

    layer.__class__ = type("Shifted", (plain,), {"base_forward": shifted})
    got = run(model, stack_inputs())
    assert len(scaled_calls) == 2  # l0, l1
    torch.testing.assert_close(got, run(model, stack_inputs(), fused=False), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_column_dots_of_row_blocks(with_bias):
    """sum_t g (z - bias) over row blocks (300 rows: a partial last block) of bf16 g, z: the float32 sum of
    the bf16 products, within one bf16 rounding per block."""
    gen = torch.Generator().manual_seed(1)
    shapes = ((300, 24), (300, 24), (24,))
    g, z, bias = (torch.randn(*shape, generator=gen).to(torch.bfloat16) for shape in shapes)
    bias = bias if with_bias else None
    want = (g * z).float().sum(0) - (0 if bias is None else g.float().sum(0) * bias.float())
    got = dora_scaled._column_dots(g, z, bias)
    assert got.dtype == torch.float32
    scale = (g * z).float().abs().sum(0)
    scale += 0 if bias is None else g.float().abs().sum(0) * bias.float().abs()
    assert ((got - want).abs() <= 2 ** -8 * scale).all()


def test_autocast_gives_way_and_matches_hf(scaled_calls):
    """Under torch.autocast the ops' dtypes are autocast's (a float32 W, bf16 GEMMs): HF PEFT's ops run."""
    got = []
    for lib in (fastpeft, peft):
        model = build(lib, "stack")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, stack_inputs())
        out.float().square().mean().backward()
        got.append((out, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    assert not scaled_calls and got[0][0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0][0], got[1][0], atol=3e-2, rtol=3e-2)
    for k, grad in got[1][1].items():
        torch.testing.assert_close(got[0][1][k], grad, atol=3e-2, rtol=3e-2, msg=lambda m, k=k: f"{k}: {m}")


def test_no_weight_sized_tensor_is_kept_for_backward(scaled_calls):
    """Between forward and backward the node holds the frozen W itself (no copy) but no other (out, in)
    tensor: Wk is formed again in backward (HF PEFT's DoRA keeps none either)."""
    model = build(fastpeft, "stack")
    weights = {id(m.base_layer.weight): m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A")}
    shapes = {tuple(w.shape) for w in weights.values()}
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(model, stack_inputs())
    assert scaled_calls
    weight_sized = [t for t in kept if tuple(t.shape) in shapes]
    ptrs = {w.data_ptr() for w in weights.values()}
    assert weight_sized and all(t.data_ptr() in ptrs for t in weight_sized)
    (out ** 2).mean().backward()  # and the rebuilt Wk gives the gradients the other tests check
