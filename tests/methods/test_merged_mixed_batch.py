"""Mixed batches of long rows through per-adapter merged weights (methods/lora/gathered.py `merged_forward`):
same outputs as HF PEFT's mixed-batch forward (adapter files going both ways), and the cases that must keep
the unmerged paths (gradients, training dropout, lora_bias, DoRA rows, short rows, half-precision bases)."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.lora import gathered
from state_helpers import assert_holds_file

from models import count_calls, make_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
ROWS = ["a1", "__base__", "a0", "a1", "a0"]
# the tiny Llama's layers are 32 x 32 and 32 x 64: >= 16 / 22 tokens per adapter take the merged path
LONG, SHORT = 24, 4


def _config(lib, i: int, **extra):
    r = (4, 8)[i % 2]
    return lib.LoraConfig(r=r, lora_alpha=r + 5 * i, use_rslora=i == 1, target_modules=TARGETS,
                          init_lora_weights=False, **extra)


def _pair(tmp_path, hf_first: bool, **extra):
    """(fastpeft, HF PEFT) with adapters a0, a1; one library saves, the other loads its files into adapters
    first drawn from another seed (a load writing nothing would leave those), and then holds their tensors."""
    lib_a, lib_b = (peft, fastpeft) if hf_first else (fastpeft, peft)
    first = lib_a.get_peft_model(make_llama(), _config(lib_a, 0, **extra), adapter_name="a0")
    first.add_adapter("a1", _config(lib_a, 1, **extra))
    first.save_pretrained(str(tmp_path))
    base = make_llama()
    torch.manual_seed(1)
    second = lib_b.PeftModel.from_pretrained(base, str(tmp_path / "a0"), adapter_name="a0")
    second.load_adapter(str(tmp_path / "a1"), "a1")
    for name in ("a0", "a1"):
        assert_holds_file(lib_b, second, tmp_path / name, name)
    ours, theirs = (second, first) if hf_first else (first, second)
    return ours.eval(), theirs.eval()


def _ids(rows: int, tokens: int) -> torch.Tensor:
    return torch.randint(0, 100, (rows, tokens), generator=torch.Generator().manual_seed(5))


def _logits(model, ids, rows, grad: bool = False):
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids, adapter_names=rows, use_cache=False).logits


@pytest.fixture
def merged_calls(monkeypatch):
    """Counts merged-path layer calls (the real function runs), so a test can tell which path ran."""
    return count_calls(monkeypatch, gathered, "merged_forward")


@pytest.mark.parametrize("hf_first", [True, False], ids=["hf_files", "fastpeft_files"])
@pytest.mark.parametrize("rows", [ROWS, ["a1"] * 2, ["a0", "a1"]],
                         ids=["with_base_rows", "one_adapter", "two"])
def test_long_rows_take_merged_weights_and_match_hf(hf_first, rows, tmp_path, merged_calls):
    ours, theirs = _pair(tmp_path, hf_first)
    ids = _ids(len(rows), LONG)
    actual = _logits(ours, ids, rows)
    assert merged_calls["n"] == 2 * len(TARGETS)  # every adapted layer of both blocks
    torch.testing.assert_close(actual, _logits(theirs, ids, rows), atol=1e-5, rtol=1e-5)


def _hf_row_by_row(theirs, ids, rows) -> torch.Tensor:
    """HF PEFT's output for each row alone with its adapter (HF PEFT refuses mixed batches with DoRA)."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name == "__base__":
                with theirs.disable_adapter():
                    outs.append(theirs(input_ids=ids[i:i + 1], use_cache=False).logits)
                continue
            theirs.set_adapter(name)
            outs.append(theirs(input_ids=ids[i:i + 1], use_cache=False).logits)
    return torch.cat(outs)


def test_short_rows_and_gradients_keep_the_unmerged_paths(tmp_path, merged_calls):
    ours, theirs = _pair(tmp_path, hf_first=False)
    for model in (ours, theirs):
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name)
    short = _ids(len(ROWS), SHORT)
    torch.testing.assert_close(_logits(ours, short, ROWS), _logits(theirs, short, ROWS), atol=1e-5, rtol=1e-5)
    assert merged_calls["n"] == 0
    long = _ids(len(ROWS), LONG)
    actual = _logits(ours, long, ROWS, grad=True)  # a graph is wanted: the LoRA factors must get gradients
    assert merged_calls["n"] == 0
    actual.square().mean().backward()
    expected = _logits(theirs, long, ROWS, grad=True)
    expected.square().mean().backward()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    theirs_grads = {k: p.grad for k, p in theirs.named_parameters() if p.grad is not None}
    assert sorted(ours_grads) == sorted(theirs_grads) and ours_grads
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("extra", [{"lora_bias": True}, {"use_dora": True}], ids=["lora_bias", "dora"])
def test_options_needing_the_loop_keep_it(extra, tmp_path, merged_calls):
    """lora_bias and DoRA rows: no merged path; outputs as HF PEFT's (row by row for DoRA, which HF PEFT
    refuses in mixed batches)."""
    ours, theirs = _pair(tmp_path, hf_first=True, **extra)
    for model in (ours, theirs):  # B's bias and DoRA's m start at neutral values: make them count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ("lora_B" in name and name.endswith("bias")) or "lora_magnitude_vector" in name:
                    param.add_(0.1)
    ids = _ids(len(ROWS), LONG)
    actual = _logits(ours, ids, ROWS)
    assert merged_calls["n"] == 0
    expected = _hf_row_by_row(theirs, ids, ROWS) if "use_dora" in extra else _logits(theirs, ids, ROWS)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_training_dropout_keeps_the_loop(tmp_path, merged_calls):
    """Training mode with dropout (even without gradients) draws masks: never the merged path. HF PEFT refuses
    adapter_names in training mode, so the oracle is its eval-mode output with dropout off (p -> 0)."""
    ours, theirs = _pair(tmp_path, hf_first=True, lora_dropout=0.3)
    ids = _ids(len(ROWS), LONG)
    ours.train()
    with torch.no_grad():
        dropped = ours(input_ids=ids, adapter_names=ROWS, use_cache=False).logits
    assert merged_calls["n"] == 0
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.testing.assert_close(_logits(ours, ids, ROWS), _logits(theirs, ids, ROWS), atol=1e-5, rtol=1e-5)
    assert merged_calls["n"] == 0  # still training mode: a Dropout module with p=0 is not the identity
    assert not torch.allclose(dropped, _logits(theirs, ids, ROWS), atol=1e-3)


def test_bf16_base_with_fp32_adapters_keeps_the_unmerged_path(tmp_path, merged_calls):
    """autocast_adapter_dtype keeps the adapters in float32 on a bfloat16 base: the dtypes differ, so the
    merged weight (in the base dtype) would round the adapter; the unmerged path runs, as in HF PEFT."""
    ours, theirs = _pair(tmp_path, hf_first=False)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    for model in (ours, theirs):
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.data = param.data.float()
    ids = _ids(len(ROWS), LONG)
    actual = _logits(ours, ids, ROWS)
    assert merged_calls["n"] == 0
    # one bf16 ulp near the logits' size (0.44); measured: bitwise equal; the adapters' effect: 0.6
    torch.testing.assert_close(actual, _logits(theirs, ids, ROWS), atol=2e-3, rtol=0)


def test_wrong_number_of_names_is_refused(tmp_path):
    ours, _ = _pair(tmp_path, hf_first=False)
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 5"):
        _logits(ours, _ids(5, LONG), ["a0", "a1", "a0"])
