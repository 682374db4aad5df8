"""Memory-lean LoRA dropout (methods/lora/lean_dropout.py): same masks, outputs and gradients as nn.Dropout
and HF PEFT under one seed, with neither the dropped input nor the mask kept for backward."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
from fastpeft.methods.lora import lean_dropout
from fastpeft.methods.lora.lean_dropout import LeanDropoutBranch

import models

P = 0.3
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(params=["bool", "regenerate"])
def mask_storage(request, monkeypatch):
    """Both ways of keeping the mask: one byte per element, or only the generator state."""
    monkeypatch.setattr(lean_dropout, "MASK_STORAGE", request.param)
    return request.param


def mask_bytes(storage: str, elements: int, layers: int) -> int:
    """What the lean path may keep beyond plain autograd without dropout: per adapted layer, a bool mask of
    its input and the 0-d float scale, or nothing when the mask is redrawn."""
    return 0 if storage == "regenerate" else elements + 4 * layers


def llama_pair(**extra):
    kw = dict(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, r=4, lora_alpha=8, lora_dropout=P, **extra)
    pair = []
    for lib in (fastpeft, peft):
        config = lib.LoraConfig(**{**kw, "task_type": lib.TaskType.CAUSAL_LM})
        pair.append(models.perturb(lib.get_peft_model(models.make_llama(), config)).train())
    return pair


def step(model, inputs, seed=7):
    """One seeded training step: the logits and the gradient of every trainable tensor."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    grads = {n.removesuffix(".weight") if "magnitude" in n else n: p.grad.clone()  # HF: DoRA's m in a module
             for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert sorted(a[1]) == sorted(b[1])
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=0, msg=f"grad {name}")


def saved_bytes(fn, model) -> tuple[int, int, torch.Tensor]:
    """(count, bytes) of the distinct storages, other than `model`'s parameters, that autograd keeps for
    backward while `fn` runs, and fn's result."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for p in model.parameters():
        seen.pop(p.untyped_storage().data_ptr(), None)
    return len(seen), sum(seen.values()), out


# ------------------------------------------------------------------ the mask itself
def test_mask_is_nn_dropouts_mask_and_rng_ends_in_the_same_place():
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(11)
    ref = nn.Dropout(P).train()(x)
    ref.backward(torch.ones_like(ref))
    ref_grad, after_ref = x.grad.clone(), torch.get_rng_state()
    x.grad = None
    torch.manual_seed(11)
    out = LeanDropoutBranch.apply(x, P, lambda d: d)
    after_forward = torch.get_rng_state()
    out.backward(torch.ones_like(out))  # the mask regenerated in backward comes out as d out / d x
    assert torch.equal(after_forward, after_ref)  # the next draws (other layers) are the same as nn.Dropout's
    assert torch.equal(torch.get_rng_state(), after_ref)  # backward leaves the generator alone
    assert torch.equal(out, ref)  # forward mask
    assert torch.equal(x.grad, ref_grad)  # backward mask, bit for bit (0 or 1 / (1 - p))
    assert torch.equal(x.grad != 0, ref != 0) and 0 < (ref == 0).float().mean() < 1


def single_linear(bias=False):
    torch.manual_seed(0)
    layer = fastpeft.get_peft_model(nn.Sequential(nn.Linear(16, 12)),
                                    fastpeft.LoraConfig(target_modules=["0"], r=4, lora_dropout=P,
                                                        lora_bias=bias))
    models.perturb(layer)
    return layer.train()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16)])
def test_linear_matches_nn_dropout_by_hand(bias, shape, mask_storage):
    model = single_linear(bias)
    lora = model.base_model.model[0]
    x = torch.randn(*shape, requires_grad=True)
    torch.manual_seed(3)
    ours = model(x)
    ours.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    x.grad = None
    a, b, base = lora.lora_A["default"], lora.lora_B["default"], lora.base_layer
    torch.manual_seed(3)
    ref = base(x) + b(a(nn.Dropout(P)(x))) * lora.scaling["default"]  # HF PEFT's formula, plain autograd
    ref.square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert torch.equal(ours, ref)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_linear_saves_only_x_and_the_rank_r_activation(mask_storage):
    model = single_linear()
    x = torch.randn(4, 16, requires_grad=True)
    _, nbytes, _ = saved_bytes(lambda: model(x), model)
    h_bytes = 4 * 4 * 4  # (tokens, r) float32: what lora_B's matmul keeps without dropout too
    # no dropped copy of x, no float mask
    assert nbytes == x.untyped_storage().nbytes() + h_bytes + mask_bytes(mask_storage, x.numel(), 1)
    model.eval()
    _, eval_bytes, _ = saved_bytes(lambda: model(x), model)
    assert nbytes <= eval_bytes + mask_bytes(mask_storage, x.numel(), 1)  # as without dropout at all


# ------------------------------------------------------------------ against HF PEFT on a tiny Llama
def test_llama_train_step_bit_identical_to_hf(mask_storage):
    ours, theirs = llama_pair()
    inputs = models.llama_inputs()
    assert_same_step(step(ours, inputs), step(theirs, inputs))
    assert_same_step(step(ours, inputs, seed=8), step(theirs, inputs, seed=8))  # second step: fresh masks


def test_llama_saves_less_than_hf(mask_storage):
    inputs = models.llama_inputs()
    sizes = {}
    for p in (P, 0.0):
        for lib, model in zip(("fastpeft", "peft"), llama_pair() if p else llama_pair_without_dropout()):
            torch.manual_seed(0)
            sizes[lib, p] = saved_bytes(lambda m=model: m(**inputs).logits, model)[:2]
    # 2 decoder layers, each with 6 projections reading 32 features (q, k, v, o, gate, up) and one reading 64
    tokens = inputs["input_ids"].numel()
    masks = mask_bytes(mask_storage, 2 * tokens * (6 * 32 + 64), 2 * 7)
    # the lean path keeps no more than training without dropout at all (HF PEFT's or ours), plus the bool
    # masks
    assert sizes["fastpeft", P][1] <= min(sizes["fastpeft", 0.0][1], sizes["peft", 0.0][1]) + masks
    # HF PEFT keeps the dropped input (an input-sized float tensor) per adapted layer on top of that
    assert sizes["peft", P][1] - sizes["fastpeft", P][1] >= 2 * tokens * 4 * (6 * 32 + 64) - masks
    if mask_storage == "regenerate":  # not one tensor more than without dropout
        assert sizes["fastpeft", P][0] <= sizes["fastpeft", 0.0][0]


def llama_pair_without_dropout():
    pair = llama_pair()
    for model in pair:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return pair


def test_determinism_under_seed():
    ours, _ = llama_pair()
    inputs = models.llama_inputs()
    first, again = step(ours, inputs, seed=5), step(ours, inputs, seed=5)
    assert_same_step(first, again)
    other = step(ours, inputs, seed=6)
    assert not torch.equal(first[0], other[0])


def test_gradient_checkpointing_recomputes_the_same_masks(mask_storage):
    ours, theirs = llama_pair()
    inputs = models.llama_inputs()
    plain = step(ours, inputs)
    for model in (ours, theirs):
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    checkpointed = step(ours, inputs)
    assert_same_step(checkpointed, plain)
    assert_same_step(checkpointed, step(theirs, inputs))


def test_bf16_autocast_matches_hf():
    ours, theirs = llama_pair()
    inputs = models.llama_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = step(ours, inputs), step(theirs, inputs)
    assert_same_step(a, b)


def test_bf16_adapter_weights_match_hf(mask_storage):
    ours, theirs = llama_pair()
    for model in (ours, theirs):
        model.to(torch.bfloat16)
    inputs = models.llama_inputs()
    assert_same_step(step(ours, inputs), step(theirs, inputs))


def test_eval_and_no_grad_take_the_plain_path():
    ours, theirs = llama_pair()
    inputs = models.llama_inputs()
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        with torch.no_grad():
            torch.manual_seed(2)
            a = ours(**inputs).logits
            torch.manual_seed(2)
            b = theirs(**inputs).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.eval()
    _, _, out = saved_bytes(lambda: ours(**inputs).logits, ours)
    names = set()
    node = out.grad_fn
    stack = [node]
    while stack:  # no lean node in eval mode: dropout is off, plain autograd is already lean
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    assert not any("LeanDropout" in n for n in names)


def test_dora_with_dropout_keeps_hf_gradients():
    ours, theirs = llama_pair(use_dora=True)
    inputs = models.llama_inputs()
    a, b = step(ours, inputs), step(theirs, inputs)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=1e-5, msg=f"grad {name}")


def test_mixed_batch_rows_get_their_own_adapter_and_mask(mask_storage):
    model = single_linear()
    model.add_adapter("other", fastpeft.LoraConfig(target_modules=["0"], r=2, lora_dropout=P))
    models.perturb(model, wanted=lambda n: "other" in n)
    lora = model.base_model.model[0]
    lora.train()
    x = torch.randn(4, 16, requires_grad=True)
    names = ["default", "other", "__base__", "default"]
    torch.manual_seed(9)
    out = lora(x, adapter_names=names)
    out.square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    torch.manual_seed(9)  # by hand: the sub-batches in sorted adapter order, each through nn.Dropout
    ref = lora.base_layer(x)
    for name, rows in (("default", [0, 3]), ("other", [1])):
        a, b = lora.lora_A[name], lora.lora_B[name]
        ref = ref.index_add(0, torch.tensor(rows), b(a(F.dropout(x[rows], P))) * lora.scaling[name])
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(got, x.grad)
