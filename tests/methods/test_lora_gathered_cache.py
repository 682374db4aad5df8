"""Stacked LoRA factors kept across calls (methods/lora/stacked.py): the fast path equals the plain path
(per-adapter loop) after every kind of change to the adapters between calls, through forward and through
generate with a KV cache; the stacks are the parameters' own storage; rows are grouped once per call."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.methods.lora import gathered, stacked

from many_lora import loop_logits, varied_lora_config, with_adapters
from many_lora import randomize_lora as randomize
from models import MODELS, count_calls

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
N = 6
# rows of different counts per adapter, base rows, and an adapter added later ("z") left out
NAMES = ["a0", "a3", "__base__", "a1", "a5", "a2", "a0", "a4", "__base__", "a5", "a3", "a0"]


def config(i: int, **extra):
    return varied_lora_config(fastpeft, i, TARGETS, **extra)


def build(n: int = N):
    return with_adapters(fastpeft, MODELS["llama"][0], TARGETS, n)


def ids(rows: int = len(NAMES), tokens: int = 5) -> torch.Tensor:
    return torch.randint(0, 50, (rows, tokens), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def stacked_calls(monkeypatch):
    """Counts the group computations served from stacks, so a test can tell the fast path ran."""
    return count_calls(monkeypatch, stacked, "stacked_output")


def plain(model, inputs, names=NAMES) -> torch.Tensor:
    return loop_logits(model, inputs, names)


def fast(model, inputs, counter, names=NAMES) -> torch.Tensor:
    before = counter["n"]
    with torch.inference_mode():
        out = model(input_ids=inputs, adapter_names=names).logits.clone()
    assert counter["n"] > before, "the stacked path did not run"
    return out


def assert_fast_equals_plain(model, counter, names=NAMES, atol=1e-5, rtol=0.0) -> torch.Tensor:
    inputs = ids(len(names))
    out = fast(model, inputs, counter, names)
    torch.testing.assert_close(out, plain(model, inputs, names), atol=atol, rtol=rtol)
    return out


def lora_weight(model, adapter: str, which: str = "lora_B", module: str = "v_proj"):
    layer = model.base_model.model.model.layers[0].self_attn.v_proj if module == "v_proj" else None
    return getattr(layer, which)[adapter].weight


def test_fast_equals_plain_and_differs_from_base(stacked_calls):
    model = build()
    out = assert_fast_equals_plain(model, stacked_calls)
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids()).logits
    rows = [i for i, n in enumerate(NAMES) if n == "__base__"]
    torch.testing.assert_close(out[rows], base[rows], atol=1e-6, rtol=0)
    assert (out[0] - base[0]).abs().max() > 0.1


@pytest.mark.parametrize("names", [
    [f"a{i}" for i in range(N)],  # one row each, in stack order: no gather / scatter at all
    [f"a{i}" for i in reversed(range(N))] * 2,  # equal row counts, another order
    ["a0"] * 7 + ["a1", "a2", "a3"],  # one adapter with many rows: one stack entry per row
    ["a1", "a3", "a4", "a5"],  # a subset of the stack
])
def test_row_layouts(names, stacked_calls):
    assert_fast_equals_plain(build(), stacked_calls, names)


def test_stacks_are_the_parameters_storage(stacked_calls):
    model = build()
    assert_fast_equals_plain(model, stacked_calls)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    cache = layer.__dict__["_lora_stacks"]
    for name, (key, i) in cache.where.items():
        stack = cache.stacks[key]
        assert layer.lora_A[name].weight.data_ptr() == stack.a[i].data_ptr()
        assert layer.lora_B[name].weight.data_ptr() == stack.b[i].data_ptr()
    assert sum(len(s.names) for s in cache.stacks.values()) == N


def test_rows_grouped_once_per_call(monkeypatch, stacked_calls):
    model = build()
    made = []
    original = stacked.RowPlan.__init__

    def counting(self, names):
        made.append(len(names))
        original(self, names)

    monkeypatch.setattr(stacked.RowPlan, "__init__", counting)
    stacked._ROW_PLANS.clear()
    names = NAMES[::-1]
    fast(model, ids(len(names)), stacked_calls, names)
    fast(model, ids(len(names)), stacked_calls, names)
    assert made == [len(names)]  # 2 calls x 2 layers x 5 targets: one grouping


def train_step(model, opt_cls, inference_first: bool):
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = opt_cls(params, lr=0.1)
    model.train()
    model(input_ids=ids(), adapter_names=NAMES).logits.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_fresh_after_optimizer_steps(opt_cls, stacked_calls):
    model = build()
    before = assert_fast_equals_plain(model, stacked_calls)  # inside inference_mode: stacks built
    train_step(model, opt_cls, True)  # parameters still trainable after an inference_mode call
    after = assert_fast_equals_plain(model, stacked_calls)
    assert (before - after).abs().max() > 1e-3
    train_step(model, opt_cls, True)
    assert_fast_equals_plain(model, stacked_calls)


def test_gradients_equal_the_loop_after_stacking(stacked_calls):
    """Stacked parameters (views of the stacks) train as before: same loss and gradients as the loop."""
    model = build()
    assert_fast_equals_plain(model, stacked_calls)

    def grads(gather: bool):
        saved = gathered.MIN_ADAPTERS
        gathered.MIN_ADAPTERS = saved if gather else 10**9
        try:
            model.zero_grad()
            for n, p in model.named_parameters():
                p.requires_grad_(".lora_" in n)
            model(input_ids=ids(), adapter_names=NAMES).logits.pow(2).mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            gathered.MIN_ADAPTERS = saved

    got, want = grads(True), grads(False)
    assert sorted(got) == sorted(want) and any(".a5." in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


EDITS = {
    "data_copy": lambda w, new: w.data.copy_(new),  # does not bump w._version
    "data_add": lambda w, new: w.data.add_(new),
    "no_grad_copy": lambda w, new: w.copy_(new),
    "data_assign": lambda w, new: setattr(w, "data", new.clone()),
    "detach_copy": lambda w, new: w.detach().copy_(new),
}


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_fresh_after_weight_edits(edit, which, stacked_calls):
    model = build()
    before = assert_fast_equals_plain(model, stacked_calls)
    weight = lora_weight(model, "a3", which)
    with torch.no_grad():
        EDITS[edit](weight, torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)))
    after = assert_fast_equals_plain(model, stacked_calls)
    rows = [i for i, n in enumerate(NAMES) if n == "a3"]
    assert (before[rows] - after[rows]).abs().max() > 1e-3


def test_fresh_after_scaling_changes(stacked_calls):
    model = build()
    before = assert_fast_equals_plain(model, stacked_calls)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    layer.set_scale("a2", 3.0)
    after = assert_fast_equals_plain(model, stacked_calls)
    assert (before - after).abs().max() > 1e-3


def test_fresh_after_adapters_added_and_deleted(stacked_calls):
    model = build()
    before = assert_fast_equals_plain(model, stacked_calls)
    model.delete_adapter("a4")
    model.add_adapter("a4", config(5))  # another rank and alpha under the old name
    model.add_adapter("z", config(1))
    randomize(model, seed=3, only="a4")
    randomize(model, seed=4, only="z")
    model.eval()
    after = assert_fast_equals_plain(model, stacked_calls)
    assert (before - after).abs().max() > 1e-3
    with_z = [n if n != "__base__" else "z" for n in NAMES]
    assert_fast_equals_plain(model, stacked_calls, with_z)
    model.delete_adapter("a1")
    assert_fast_equals_plain(model, stacked_calls, [n if n != "a1" else "a2" for n in with_z])


def test_fresh_after_module_swap(stacked_calls):
    model = build()
    assert_fast_equals_plain(model, stacked_calls)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    old = layer.lora_A["a2"]
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    layer.lora_A["a2"] = new
    assert_fast_equals_plain(model, stacked_calls)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fresh_after_dtype_change(dtype, stacked_calls):
    model = build()
    assert_fast_equals_plain(model, stacked_calls)
    model.to(dtype)
    bf16 = dtype == torch.bfloat16  # bf16: the loop and the batched matmuls round differently
    tol = {"atol": 0.1, "rtol": 0.05} if bf16 else {"atol": 1e-10}
    out = assert_fast_equals_plain(model, stacked_calls, **tol)
    assert out.dtype == dtype
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert all(s.a.dtype == dtype for s in layer.__dict__["_lora_stacks"].stacks.values())


def test_hooked_factor_falls_back(stacked_calls):
    model = build()
    assert_fast_equals_plain(model, stacked_calls)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    handle = layer.lora_B["a1"].register_forward_hook(lambda mod, args, out: out * 2)
    inputs = ids()
    with torch.inference_mode():
        got = model(input_ids=inputs, adapter_names=NAMES).logits
    torch.testing.assert_close(got, plain(model, inputs), atol=1e-5, rtol=0)
    handle.remove()
    assert_fast_equals_plain(model, stacked_calls)


def test_generate_with_kv_cache_equals_the_loop(stacked_calls):
    model = build()
    prompt = ids(len(NAMES), 4)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True, "use_cache": True, "pad_token_id": 0}
    before = stacked_calls["n"]
    got = model.generate(input_ids=prompt, adapter_names=NAMES, **kwargs)
    assert stacked_calls["n"] > before
    saved, gathered.MIN_ADAPTERS = gathered.MIN_ADAPTERS, 10**9
    try:
        want = model.generate(input_ids=prompt, adapter_names=NAMES, **kwargs)
    finally:
        gathered.MIN_ADAPTERS = saved
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    # an edit between two generate calls is seen by the next one
    lora_weight(model, "a0").data.mul_(-3.0)
    again = model.generate(input_ids=prompt, adapter_names=NAMES, **kwargs)
    gathered.MIN_ADAPTERS = 10**9
    try:
        want = model.generate(input_ids=prompt, adapter_names=NAMES, **kwargs)
    finally:
        gathered.MIN_ADAPTERS = saved
    for g, w in zip(again.scores, want.scores):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    assert (again.scores[0] - got.scores[0]).nan_to_num().abs().max() > 1e-3  # -inf: suppressed tokens


def test_saved_files_hold_only_their_adapter(stacked_calls, tmp_path):
    model = build()
    assert_fast_equals_plain(model, stacked_calls)
    own = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".a2." in n)
    for safe, file in ((True, "adapter_model.safetensors"), (False, "adapter_model.bin")):
        model.save_pretrained(tmp_path / file, selected_adapters=["a2"], safe_serialization=safe)
        # a2's own bytes and a header, not its whole stack (shared with a5)
        assert (tmp_path / file / "a2" / file).stat().st_size < 1.5 * own
    fresh = build()
    randomize(fresh, seed=9, only="a2")
    fresh.load_adapter(tmp_path / "adapter_model.bin" / "a2", adapter_name="a2")
    inputs = ids()
    torch.testing.assert_close(plain(fresh, inputs), plain(model, inputs), atol=1e-6, rtol=0)
