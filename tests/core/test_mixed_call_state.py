"""Mixed-adapter batches reach the layers through the tuner's shared call state (core/layer.py `CallState`):
no hooks and no walk over the model per call, and layers added or copied later still see the names.
Outputs are checked against HF PEFT's mixed-batch forward on the same adapters, files going both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.core.tuner import Tuner

from models import make_llama

ROWS = ["second", "__base__", "first", "second"]


def _config(lib, **kw):
    return lib.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def _ids(rows: int = len(ROWS)) -> torch.Tensor:
    return torch.randint(0, 50, (rows, 5), generator=torch.Generator().manual_seed(3))


def _logits(model, rows=ROWS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(len(rows)), adapter_names=rows, use_cache=False, **kw).logits


def _pair(tmp_path, hf_first: bool):
    """(fastpeft, HF PEFT) models with adapter "first" on q_proj and "second", added later, on other modules
    (v_proj, down_proj) and each its own modules_to_save copy of lm_head: layers the tuner creates after the
    first bind."""
    lib_a, lib_b = (peft, fastpeft) if hf_first else (fastpeft, peft)
    torch.manual_seed(0)
    first = lib_a.get_peft_model(make_llama(),
                                 _config(lib_a, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                 adapter_name="first")
    first.add_adapter("second", _config(lib_a, target_modules=["v_proj", "down_proj"],
                                        modules_to_save=["lm_head"]))
    with torch.no_grad():  # HF PEFT's mixed batch needs a copy for every adapter named (KeyError otherwise)
        for i, copy_ in enumerate(first.base_model.model.lm_head.modules_to_save.values()):
            copy_.weight.add_(0.5 * (i + 1))
    first.save_pretrained(str(tmp_path))
    second = lib_b.PeftModel.from_pretrained(make_llama(), str(tmp_path / "first"), adapter_name="first")
    second.load_adapter(str(tmp_path / "second"), "second")
    ours, theirs = (second, first) if hf_first else (first, second)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("hf_first", [True, False], ids=["hf_files", "fastpeft_files"])
def test_layers_added_later_follow_the_rows_like_hf(hf_first, tmp_path):
    ours, theirs = _pair(tmp_path, hf_first)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)
    ours.delete_adapter("first")  # q_proj layers dropped, the set re-bound: rows not naming "first" unchanged
    rows = ["second", "__base__", "second"]
    torch.testing.assert_close(_logits(ours, rows), _logits(theirs, rows), atol=1e-5, rtol=1e-5)


def test_a_call_neither_walks_the_model_nor_registers_hooks(tmp_path, monkeypatch):
    ours, theirs = _pair(tmp_path, hf_first=False)
    expected = _logits(theirs)
    walks, hooks = [], []
    holders, register = Tuner.holders, nn.Module.register_forward_pre_hook
    monkeypatch.setattr(Tuner, "holders", lambda self: walks.append(1) or holders(self))
    monkeypatch.setattr(nn.Module, "register_forward_pre_hook",
                        lambda self, *a, **k: hooks.append(1) or register(self, *a, **k))
    for _ in range(2):
        torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=1e-5)
    assert (walks, hooks) == ([], [])


def test_deep_copy_runs_its_own_rows(tmp_path):
    """A deep-copied PeftModel's layers share the copy's call state, not the original's."""
    ours, theirs = _pair(tmp_path, hf_first=True)
    clone = copy.deepcopy(ours)
    layer = clone.base_model.model.model.layers[0].self_attn.v_proj
    assert layer._call_state is clone.tuner.call_state is not ours.tuner.call_state
    torch.testing.assert_close(_logits(clone), _logits(theirs), atol=1e-5, rtol=1e-5)


def test_state_is_cleared_after_a_failing_call(tmp_path):
    """A call that raises leaves no names behind: the next plain call uses the active adapter on every row."""
    ours, theirs = _pair(tmp_path, hf_first=False)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4"):
        with torch.no_grad():
            ours(input_ids=_ids(), adapter_names=["first", "second"], use_cache=False)
    assert ours.tuner.call_state.names is None
    with torch.no_grad():
        plain = ours(input_ids=_ids(), use_cache=False).logits
        expected = theirs(input_ids=_ids(), use_cache=False).logits
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
