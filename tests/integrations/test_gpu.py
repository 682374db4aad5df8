"""fastpeft on a CUDA device: outputs and gradients against a CPU float64 reference, torch.compile, host
syncs.

The CUDA tests carry the `gpu` marker (pyproject.toml) and are skipped, with the reason in the summary, where
there is no CUDA device; `pytest -m gpu` runs only them on a GPU machine. The same comparisons also run on the
CPU in bf16 / fp16 (unmarked), so the test code itself is exercised everywhere, and the tolerances below were
calibrated there (a GPU's reduction orders differ, its rounding does not: same formats).

Tolerances are relative Frobenius errors ||out - ref|| / ||ref|| against the model run in float64 on the CPU:
bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3), fp16 11 bits (2.4e-4); a 2-layer model stacks a few
dozen roundings, so 3e-2 and 4e-3. Each test also checks that the adapter moves the output by more than ten
times the tolerance, so the comparison cannot pass with the adapter ignored.

Host syncs: `torch.cuda.set_sync_debug_mode("error")` raises on any operation that waits for the device
(`.item()`, `.tolist()`, `nonzero`, boolean indexing, a blocking host-to-device copy); the LoRA forward,
mixed-batch and training paths run under it. DoRA's row norm has one known sync per layer (the check for rows
that lost precision to cancellation, variants/dora.py `row_norm`): counted, not hidden.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import fastpeft
from fastpeft.core.device_index import index_tensor

import models

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: the `gpu` tests compare CUDA runs with a CPU float64 reference (`pytest -m gpu`)"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
ADAPTERS = ["a0", "a1", "a2", "a3", "a4"]  # five: above the gathered path's minimum of four adapters


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def randomize(model, seed: int) -> None:
    """Adapter weights far from their init (B != 0, magnitudes != norms): a visible adapter effect."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1)


def llama_lora(names=("default",), **options):
    """A tiny Llama in float64 with LoRA r=4 on all linear layers, one adapter per name."""
    base = models.make_llama().double()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", **options)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, fastpeft.LoraConfig(**config))
    randomize(model, 1)
    return model


def ids(rows: int = 3, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, 100, (rows, tokens), generator=torch.Generator().manual_seed(2))


def logits_and_grads(model, x: torch.Tensor, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x, **kwargs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits, grads


def check_against_float64(model, device: str, dtype: torch.dtype, x: torch.Tensor, **kwargs) -> None:
    """Logits and every adapter gradient of `model` moved to (device, dtype) match the float64 CPU run."""
    ref_logits, ref_grads = logits_and_grads(model, x, **kwargs)
    with model.disable_adapter(), torch.no_grad():
        effect = rel_err(model(input_ids=x).logits, ref_logits)
    low = copy.deepcopy(model).to(device=device, dtype=dtype)
    logits, grads = logits_and_grads(low, x.to(device), **kwargs)
    assert sorted(grads) == sorted(ref_grads) and grads
    tol = TOL[dtype]
    assert effect > 10 * tol, f"the adapter barely changes the output ({effect:.3g})"
    assert rel_err(logits, ref_logits) < tol
    worst = max(rel_err(grads[n], g) for n, g in ref_grads.items())
    assert worst < 5 * tol, f"worst adapter gradient relative error {worst:.3g}"  # sums over all tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_matches_float64(device, dtype):
    check_against_float64(llama_lora(), device, dtype, ids())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_dora_matches_float64(device, dtype):
    check_against_float64(llama_lora(use_dora=True), device, dtype, ids())


@pytest.mark.parametrize("adapters", [ADAPTERS[:2], ADAPTERS], ids=["loop", "gathered"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_matches_float64_rows(device, dtype, adapters):
    """Each row of a mixed batch on (device, dtype) equals that row alone with its adapter set, in float64."""
    model = llama_lora(names=adapters).eval()
    names = adapters + ["__base__"] + adapters[:1]
    x = ids(len(names))
    ref = []
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    ref.append(model(input_ids=x[row:row + 1]).logits)
            else:
                model.set_adapter(name)
                ref.append(model(input_ids=x[row:row + 1]).logits)
        ref = torch.cat(ref)
        low = copy.deepcopy(model).to(device=device, dtype=dtype)
        out = low(input_ids=x.to(device), adapter_names=names).logits
    tol = TOL[dtype]
    for row, name in enumerate(names):
        assert rel_err(out[row], ref[row]) < tol, f"row {row} ({name})"
    assert rel_err(ref[0], ref[1]) > 10 * tol  # different adapters give different rows


@pytest.mark.parametrize("adapters", [ADAPTERS[:2], ADAPTERS], ids=["loop", "gathered"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_training_matches_float64(device, adapters):
    """With autograd on (the gathered path then reads the live parameters): logits and every adapter's
    gradient on (device, bf16) equal the float64 run of the same mixed batch."""
    names = adapters + ["__base__"] + adapters[:1]
    check_against_float64(llama_lora(names=adapters), device, torch.bfloat16, ids(len(names)),
                          adapter_names=names)


def test_index_tensor_equals_torch_tensor():
    for values, dtype in (([3, 0, 2], torch.long), ([0.5, 2.0], torch.float64)):
        got = index_tensor(values, torch.device("cpu"), dtype)
        assert torch.equal(got, torch.tensor(values, dtype=dtype)) and got.dtype == dtype
    if CUDA:
        got = index_tensor([3, 0, 2], torch.device("cuda"))
        assert got.device.type == "cuda" and got.tolist() == [3, 0, 2]


# ------------------------------------------------------------------------------------------------ CUDA only


def has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not has_bnb(), reason="bitsandbytes is not installed")
@pytest.mark.parametrize("device", DEVICES)
def test_qlora_matches_hf_peft(tmp_path, device):
    """A 4-bit base (bitsandbytes nf4, bf16 compute): fastpeft's LoRA equals HF PEFT's with the same adapter
    weights (both read the same quantized weights), and the adapter changes the output."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    # hidden 64: bitsandbytes' CPU 4-bit kernels need in_features >= its 64-value quantization block
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16)
    outs = {}
    for lib in (fastpeft, peft):
        base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                device_map={"": 0 if device == "cuda" else "cpu"})
        model = lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize(model, 1)
        x = ids().to(device)
        logits, grads = logits_and_grads(model, x)
        with model.disable_adapter(), torch.no_grad():
            plain = model(input_ids=x).logits
        outs[lib.__name__] = logits, {n.replace(".default", ""): g for n, g in grads.items()}, plain
    (logits, grads, plain), (hf_logits, hf_grads, _) = outs["fastpeft"], outs["peft"]
    tol = TOL[torch.bfloat16]
    assert rel_err(plain, hf_logits) > 10 * tol
    assert rel_err(logits, hf_logits) < tol
    assert sorted(grads) == sorted(hf_grads)
    assert max(rel_err(grads[n], g) for n, g in hf_grads.items()) < 5 * tol


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_compiled_lora_cuda_equals_eager(use_dora):
    """torch.compile (inductor, CUDA) of a LoRA / DoRA model, single adapter and a mixed batch."""
    torch._dynamo.reset()
    model = llama_lora(names=ADAPTERS, use_dora=use_dora).eval().to(device="cuda", dtype=torch.bfloat16)
    x = ids(len(ADAPTERS)).cuda()
    compiled = torch.compile(model)
    with torch.no_grad():
        for kwargs in ({}, {"adapter_names": ADAPTERS}):
            eager = model(input_ids=x, use_cache=False, **kwargs).logits
            got = compiled(input_ids=x, use_cache=False, **kwargs).logits
            assert rel_err(got, eager) < TOL[torch.bfloat16]
    torch._dynamo.reset()


def mlp_lora(names, use_dora: bool = False):
    base = models.make_mlp()
    config = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["head"],
                  use_dora=use_dora)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, fastpeft.LoraConfig(**config))
    randomize(model, 1)
    return model.cuda()


def hot_paths(model, names):
    """The calls a serving / training loop repeats: forward with one adapter, mixed batches (the loop for two
    adapters, the gathered path for five, long rows through merged weights; `head` is a per-adapter
    modules_to_save copy), a training step."""
    x = torch.randn(len(names), 10, device="cuda")
    long = torch.randn(2, 64, 10, device="cuda")  # 64 tokens per row: merged weights (gathered.merged_plan)
    with torch.no_grad():
        model.eval()
        model(x)
        model(x[:2], adapter_names=names[:2])
        model(x, adapter_names=names)
        model(long, adapter_names=names[:2])
    model.train()
    model(x).sum().backward()
    model(x, adapter_names=names).sum().backward()
    model.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_lora_hot_paths_never_sync():
    model = mlp_lora(ADAPTERS)
    hot_paths(model, ADAPTERS)  # warm-up: CUDA context, cuBLAS handles, lazy allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hot_paths(model, ADAPTERS)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_dora_long_rows_take_no_cpu_only_path():
    """Rows of many tokens (where the CPU uses the one-GEMM form, variants/dora_scaled.py, whose backward
    reads the magnitudes on the host): on CUDA the training step runs the other forms, equal to float64."""
    from fastpeft.methods.lora.variants import dora_scaled

    model = mlp_lora(["a0"], use_dora=True).train()
    x = torch.randn(64, 10, device="cuda")
    calls = []
    original = dora_scaled.DoraScaledOutput.apply
    dora_scaled.DoraScaledOutput.apply = lambda *a: calls.append(1) or original(*a)
    try:
        model(x).sum().backward()
    finally:
        dora_scaled.DoraScaledOutput.apply = original
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_dora_forward_syncs_once_per_layer():
    """DoRA's one known sync: `bad.any()` in row_norm, once per DoRA layer per forward."""
    model = mlp_lora(["a0"], use_dora=True).eval()
    x = torch.randn(3, 10, device="cuda")
    with torch.no_grad():
        model(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, [str(w.message) for w in syncs]  # two DoRA layers (lin0, lin1)
