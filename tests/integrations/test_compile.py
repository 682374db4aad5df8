"""torch.compile over fastpeft LoRA models: no graph breaks from the adapter layers, same outputs as eager.

Breaks are counted with `torch._dynamo.explain`; the tiny Llama itself compiles in one graph (checked below),
so every break would be fastpeft's. `fullgraph=True` compiles then prove there is none at all (explain does
not count frames dynamo skips whole). The compiled outputs are checked against the eager ones and against HF
PEFT (eager) holding the same adapter, loaded from the other library's files, both directions.
`backend="eager"` / `"aot_eager"` trace and (aot) autograd-split without inductor's compile time.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import fastpeft
from state_helpers import assert_holds_file

import models

ATOL = 1e-5
LLAMA_INPUTS = {**models.llama_inputs(), "use_cache": False}  # the KV cache object breaks transformers' graph

CASES = {  # id: (model, LoraConfig kwargs)
    "qv": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
    "all_linear": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=8)),
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8)),
    "dora": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, use_dora=True)),
    "dora_mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, use_dora=True)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    dynamo.reset()
    yield
    dynamo.reset()


def inputs(model_name: str):
    return LLAMA_INPUTS if model_name == "llama" else models.mlp_inputs()


def base(model_name: str):
    return models.make_llama() if model_name == "llama" else models.make_mlp()


def config(lib, case: str, **extra):
    kw = {**CASES[case][1], "init_lora_weights": False, **extra}  # B != 0: the adapters change the output
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    return lib.LoraConfig(**kw)


def call(model, batch, **kwargs):
    out = model(**batch, **kwargs) if isinstance(batch, dict) else model(batch, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def graph_breaks(model, batch, **kwargs) -> tuple[int, list[str]]:
    """torch._dynamo.explain's break count and reasons for one call of `model`."""
    dynamo.reset()
    args, kw = ((), {**batch, **kwargs}) if isinstance(batch, dict) else ((batch,), kwargs)
    report = dynamo.explain(model)(*args, **kw)
    dynamo.reset()
    reasons = [f"{b.reason}".splitlines()[0] + f" at {b.user_stack[-1] if b.user_stack else '?'}"
               for b in report.break_reasons]
    return report.graph_break_count, reasons


def compiled_call(model, batch, backend: str = "eager", **kwargs) -> torch.Tensor:
    """`model` compiled (one trace) and called; asserts dynamo counted no graph break and made exactly one
    graph (a frame dynamo skips whole is no counted break, but leaves more or fewer graphs)."""
    counters.clear()
    out = call(torch.compile(model, backend=backend), batch, **kwargs)
    breaks = dict(counters["graph_break"])
    assert not breaks, breaks
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    return out


def assert_compiles_like_eager(model, batch, **kwargs) -> torch.Tensor:
    """No graph break, compiled output == eager output; returns it."""
    with torch.no_grad():
        expected = call(model, batch, **kwargs)
        actual = compiled_call(model, batch, **kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    return actual


def pair(case: str, tmp_path, hf_first: bool):
    """(fastpeft model, HF PEFT model) holding the same adapter, one loaded from the other's files (into an
    adapter first drawn from another seed: it must end up holding the file's tensors)."""
    model_name = CASES[case][0]
    lib_a, lib_b = (peft, fastpeft) if hf_first else (fastpeft, peft)
    first = lib_a.get_peft_model(base(model_name), config(lib_a, case)).eval()
    first.save_pretrained(str(tmp_path / "first"))
    second = lib_b.PeftModel.from_pretrained(reseeded(base(model_name)), str(tmp_path / "first")).eval()
    assert_holds_file(lib_b, second, tmp_path / "first")
    return (second, first) if hf_first else (first, second)


def reseeded(model):
    """`model`, torch's RNG reseeded: adapters loaded into it start from other values than the saved ones."""
    torch.manual_seed(1)
    return model


def test_base_models_compile_without_breaks():
    """The reference point: the bare models give one graph, so any break below comes from fastpeft."""
    for name in ("llama", "mlp"):
        model = base(name)
        assert graph_breaks(model, inputs(name)) == (0, [])
        compiled_call(model, inputs(name))


@pytest.mark.parametrize("case", ["all_linear", "dora"])
def test_explain_counts_no_breaks(case):
    """torch._dynamo.explain over the whole PeftModel forward: as many breaks as the bare model (none)."""
    model = fastpeft.get_peft_model(base(CASES[case][0]), config(fastpeft, case)).eval()
    assert graph_breaks(model, inputs(CASES[case][0])) == (0, [])


@pytest.mark.parametrize(("case", "hf_first"), [("qv", True), ("all_linear", False), ("mlp", True),
                                              ("mlp", False), ("dora", True), ("dora_mlp", False)])
def test_compiled_forward_matches_eager_and_hf(case, hf_first, tmp_path):
    """hf_first: HF PEFT's files loaded by fastpeft; else fastpeft's files loaded by HF PEFT."""
    ours, theirs = pair(case, tmp_path, hf_first)
    batch = inputs(CASES[case][0])
    actual = assert_compiles_like_eager(ours, batch)
    with torch.no_grad():
        torch.testing.assert_close(actual, call(theirs, batch), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", ["all_linear", "dora_mlp"])
def test_train_mode_with_dropout(case):
    """lora_dropout > 0 in training mode: same random draws, outputs and gradients as eager (aot_eager runs
    the compiled backward) and as HF PEFT from the same seed."""
    model_name = CASES[case][0]
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(base(model_name), config(fastpeft, case, lora_dropout=0.2)).train()
    theirs = peft.get_peft_model(base(model_name), config(peft, case, lora_dropout=0.2)).train()
    theirs.load_state_dict(_as_hf_state(ours, theirs))
    batch = inputs(model_name)
    counters.clear()
    compiled = torch.compile(ours, backend="aot_eager")
    runs = [_loss_and_grads(m, batch, seed=3) for m in (compiled, ours, theirs)]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for (loss, grads), what in zip(runs[1:], ("eager", "HF PEFT")):
        torch.testing.assert_close(runs[0][0], loss, atol=ATOL, rtol=1e-5, msg=what)
        assert sorted(grads) == sorted(runs[0][1])
        for key, grad in grads.items():
            torch.testing.assert_close(runs[0][1][key], grad, atol=ATOL, rtol=1e-4, msg=f"{what} {key}")


def test_train_mode_with_dropout_under_autocast():
    """Under autocast the eager dropout branch replays from a saved RNG state (which does not trace); the
    compiled forward uses plain dropout instead: one graph, the same loss and gradients as eager."""
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(models.make_mlp(), config(fastpeft, "mlp", lora_dropout=0.2)).train()
    counters.clear()
    compiled = torch.compile(ours, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [_loss_and_grads(m, models.mlp_inputs(), seed=3) for m in (compiled, ours)]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # about one bf16 ulp of the gradients (up to 0.16); measured: bitwise equal. Another dropout draw moves
    # the loss by 1e-2 and every gradient by 4e-2 or more: the tolerance tells the draws apart
    atol = 1e-3
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=atol, rtol=0)
    for key, grad in runs[1][1].items():
        torch.testing.assert_close(runs[0][1][key], grad, atol=atol, rtol=0, msg=key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other_loss, other_grads = _loss_and_grads(ours, models.mlp_inputs(), seed=4)
    assert (other_loss - runs[1][0]).abs() > 5 * atol
    assert all((other_grads[k] - g).abs().max() > 10 * atol for k, g in runs[1][1].items())


def test_dora_cancelling_rows_in_graph():
    """DoRA rows where W and s B A nearly cancel are recomputed directly in eager; compiled, the graph does it
    without a Python branch (torch.cond): same output as eager and as HF PEFT (which always computes
    directly)."""
    torch.manual_seed(0)
    ours = fastpeft.get_peft_model(models.make_mlp(), config(fastpeft, "dora_mlp")).eval()
    theirs = peft.get_peft_model(models.make_mlp(), config(peft, "dora_mlp")).eval()
    layer = ours.get_base_model().lin0
    a, b = layer.lora_weights("default")
    with torch.no_grad():  # rows 0 and 3: W_o = -s (B A)_o + tiny
        w = layer.get_base_layer().weight
        w[[0, 3]] = -layer.scaling["default"] * (b[[0, 3]] @ a) + 1e-2 * torch.randn(2, w.shape[1])
    theirs.load_state_dict(_as_hf_state(ours, theirs))
    batch = models.mlp_inputs()
    actual = assert_compiles_like_eager(ours, batch)
    with torch.no_grad():
        torch.testing.assert_close(actual, call(theirs, batch), atol=ATOL, rtol=1e-4)


def _as_hf_state(ours, theirs) -> dict:
    """fastpeft's state dict under HF PEFT's keys (DoRA's m is a ParameterDict entry here, `.weight`
    there)."""
    state = {}
    for key, value in ours.state_dict().items():
        hf_key = key if key in theirs.state_dict() else f"{key}.weight"
        state[hf_key] = value
    assert sorted(state) == sorted(theirs.state_dict())
    return state


def _loss_and_grads(model, batch, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = call(model, batch).float().pow(2).mean()
    loss.backward()
    grads = {k.replace(".weight", ""): p.grad for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {k.replace("_orig_mod.", ""): g for k, g in grads.items()}


@pytest.mark.parametrize("case", ["qv", "dora_mlp"])
def test_two_active_adapters(case, tmp_path):
    """Both adapters' outputs added in one graph; HF PEFT's files -> fastpeft, same outputs as HF PEFT."""
    model_name = CASES[case][0]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base(model_name), config(peft, case))
    theirs.add_adapter("other", config(peft, case, r=2))
    theirs.save_pretrained(str(tmp_path))
    theirs.base_model.set_adapter(["default", "other"])
    ours = fastpeft.PeftModel.from_pretrained(reseeded(base(model_name)), str(tmp_path)).eval()
    ours.load_adapter(str(tmp_path / "other"), "other")
    assert_holds_file(fastpeft, ours, tmp_path)
    assert_holds_file(fastpeft, ours, tmp_path / "other", "other")
    ours.base_model.set_adapter(["default", "other"])
    batch = inputs(model_name)
    actual = assert_compiles_like_eager(ours, batch)
    with torch.no_grad():
        torch.testing.assert_close(actual, call(theirs.eval(), batch), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("n_adapters", [2, 4], ids=["loop", "gathered"])
def test_mixed_batch_adapter_layers(n_adapters, tmp_path):
    """Mixed batches (adapter_names): the adapter layers' per-row paths (the loop for few adapters, the
    gathered batched matmuls for 4+) trace as one graph; the per-row names are set on the tuner's shared call
    state outside the compiled region, as a compiled serving loop would do."""
    names, ours, theirs = _adapters_in_both(n_adapters, tmp_path)
    rows = (names + ["__base__"]) * 2
    batch = {k: v.repeat(len(rows) // 2, 1) if torch.is_tensor(v) else v for k, v in LLAMA_INPUTS.items()}
    batch = {k: v[: len(rows)] if torch.is_tensor(v) else v for k, v in batch.items()}
    inner = ours.get_base_model()
    with ours.tuner.mixed_batch(rows):
        actual = assert_compiles_like_eager(inner, batch)
    with torch.no_grad():
        torch.testing.assert_close(actual, call(theirs, batch, adapter_names=rows), atol=ATOL, rtol=1e-5)


def _adapters_in_both(n_adapters: int, tmp_path, r: int | None = None):
    """`n_adapters` seeded LoRA adapters in fastpeft (the later ones with rank `r`), saved and loaded into HF
    PEFT."""
    torch.manual_seed(0)
    names = [f"a{i}" for i in range(n_adapters)]
    ours = fastpeft.get_peft_model(models.make_llama(), config(fastpeft, "qv"), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, config(fastpeft, "qv", **({} if r is None else {"r": r})))
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(reseeded(models.make_llama()), str(tmp_path / names[0]),
                                            adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(str(tmp_path / name), name)
    for name in names:
        assert_holds_file(peft, theirs, tmp_path / name, name)
    return names, ours.eval(), theirs.eval()


@pytest.mark.parametrize(("n_adapters", "tokens", "path"),
                         [(2, 6, "loop"), (4, 6, "gathered"), (2, 24, "merged")],
                         ids=["loop", "gathered", "merged"])
def test_peft_model_forward_with_adapter_names_compiles(n_adapters, tokens, path, tmp_path, monkeypatch):
    """`PeftModel(..., adapter_names=rows)` compiled whole (fullgraph): the per-row names reach the layers
    through the tuner's shared call state (no per-call hooks), so there is no graph break. Dynamo guards on
    the names, so another mix recompiles (checked: the second mix is right, not a stale graph). Both compiled
    outputs equal eager and HF PEFT's mixed-batch forward on the same adapters, loaded from fastpeft's files.
    Each layer path (methods/lora/gathered.py) is covered: the eager run checks which one the rule picks."""
    from fastpeft.methods.lora import gathered

    ran = set()
    for name, label in (("group_output", "gathered"), ("merged_forward", "merged")):
        original = getattr(gathered, name)
        monkeypatch.setattr(gathered, name, lambda *a, _f=original, _l=label, **k: ran.add(_l) or _f(*a, **k))
    names, ours, theirs = _adapters_in_both(n_adapters, tmp_path, r=2)
    ids = torch.randint(0, 50, (n_adapters + 1, tokens), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "use_cache": False}
    mixes = [names + ["__base__"], ["__base__"] + names[::-1]]
    with torch.no_grad():
        call(ours, batch, adapter_names=mixes[0])
    assert ran == ({path} - {"loop"})
    assert graph_breaks(ours, batch, adapter_names=mixes[0]) == (0, [])
    counters.clear()
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        for rows in mixes:
            actual = call(compiled, batch, adapter_names=rows)
            torch.testing.assert_close(actual, call(ours, batch, adapter_names=rows), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(actual, call(theirs, batch, adapter_names=rows), atol=ATOL, rtol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(mixes), dict(counters["stats"])  # one per mix
    assert ours.tuner.call_state.names is None  # nothing left behind for the next (normal) call
