"""The one all-or-nothing mechanism (core/transaction.py) and what its users rely on.

- Undo steps run last-first and only on failure; values declared with `keep_values` come back, also across the
  meta / real boundary and to their old shape; KeyboardInterrupt rolls back too; a failing undo step leaves a
  note and the other steps still run.
- Nested transactions record nothing twice: one module-state record per load (from_pretrained's inner
  load_adapter joins it), a tensor is copied once and not at all when it was made after the root's record; a
  joined transaction that fails takes back its own part at once.
- Injection: a layer build failing half-way leaves the model as it was, base weights rewritten by an init
  (PiSSA) included; a failure after the swap deletes the adapter from every holder (new modules_to_save
  wrappers unwrapped, existing layers keep their other adapters and hand-set flags); steps a method adds after
  the generic injection (LoRA's trainable tokens) are inside the same transaction.
- The cyclic garbage collector is paused inside a transaction and left as it was after, on success and
  failure.
- The per-model flags live in one object (`flags_of`); nothing hidden is left on the user's model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.core import transaction
from fastpeft.core.flags import flags_of
from fastpeft.core.layer import AdapterLayer
from fastpeft.core.transaction import Transaction, swap_in
from fastpeft.core.tuner import Tuner
from fastpeft.methods.lora import token_rows
from fastpeft.methods.lora.model import LoraModel
from state_helpers import assert_same_state, hf_saved, state_of

import models


def lora(**kwargs):
    return fastpeft.LoraConfig(**{"r": 2, "target_modules": ["lin0", "lin1"], **kwargs})


# ------------------------------------------------------------------------------------------ the mechanism
def test_undo_steps_run_last_first_and_only_on_failure():
    ran = []
    with Transaction(nn.Linear(2, 2)) as tx:
        tx.on_failure(lambda: ran.append("never"))
    assert ran == []
    with pytest.raises(RuntimeError, match="boom"):
        with Transaction(nn.Linear(2, 2)) as tx:
            tx.on_failure(lambda: ran.append(1))
            tx.on_failure(lambda: ran.append(2))
            raise RuntimeError("boom")
    assert ran == [2, 1]


def test_values_come_back_across_resizes_meta_and_interrupts():
    layer = nn.Linear(3, 2)
    weight, bias = layer.weight, layer.bias
    before = weight.detach().clone(), bias.detach().clone()
    empty = nn.Parameter(torch.empty(4, device="meta"))
    with pytest.raises(KeyboardInterrupt):
        with Transaction(layer) as tx:
            tx.keep_values([weight, bias, empty], device="cpu")  # a meta tensor is copied as meta
            with torch.no_grad():
                weight.add_(1.0)
            swap_in(bias, torch.zeros(5))  # resized, as a method may resize a tensor for a file
            swap_in(empty, torch.ones(4))  # filled, as a load fills a weight built on the meta device
            raise KeyboardInterrupt
    assert layer.weight is weight and layer.bias is bias
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    assert empty.is_meta and empty.shape == (4,)


def test_a_failing_undo_step_leaves_a_note_and_the_rest_still_runs():
    ran = []

    def broken():
        raise OSError("disk gone")

    with pytest.raises(ValueError) as err:
        with Transaction(nn.Linear(2, 2)) as tx:
            tx.on_failure(lambda: ran.append("first"))
            tx.on_failure(broken)
            raise ValueError("the change failed")
    assert ran == ["first"]
    assert any("OSError: disk gone" in note for note in err.value.__notes__)


def test_nested_transactions_record_once_and_take_back_their_own_part():
    model = models.make_mlp()
    weight = model.lin0.weight
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="outer"):
        with Transaction(model, record_state=True) as outer:
            model.extra = nn.Linear(1, 1)  # made inside: the module-state record drops it
            with pytest.raises(ValueError):
                with Transaction(model, record_state=True) as inner:
                    assert inner.root is outer and inner.state is None  # joined: no second record
                    inner.keep_values([weight, weight, model.extra.weight])
                    assert [t for t, _ in outer.values] == [weight]  # once; the new tensor needs no copy
                    with torch.no_grad():
                        weight.add_(1.0)
                    raise ValueError("inner")
            assert torch.equal(weight, before) and outer.values == []  # its part came back at once
            outer.keep_values([weight])
            with torch.no_grad():
                weight.mul_(3.0)
            raise RuntimeError("outer")
    assert "extra" not in model._modules and not hasattr(model, "extra")
    assert torch.equal(weight, before)
    assert transaction._OPEN.get() == ()


@pytest.mark.parametrize("collector_on", [True, False])
def test_the_collector_is_paused_inside_and_left_as_it_was_after(collector_on):
    import gc

    seen = []
    was = gc.isenabled()
    try:
        (gc.enable if collector_on else gc.disable)()
        with Transaction(nn.Linear(2, 2), record_state=True):
            with Transaction(nn.Linear(2, 2)):  # another model: a root of its own, nested
                seen.append(gc.isenabled())
            seen.append(gc.isenabled())
        assert gc.isenabled() is collector_on
        with pytest.raises(RuntimeError):
            with Transaction(nn.Linear(2, 2)):
                raise RuntimeError("boom")
        assert gc.isenabled() is collector_on and seen == [False, False]
    finally:
        (gc.enable if was else gc.disable)()


def _count_records(monkeypatch) -> list[int]:
    made = [0]

    class Counted(transaction.ModelState):
        def __init__(self, *args, **kwargs):
            made[0] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(transaction, "ModelState", Counted)
    return made


def test_a_load_records_the_module_state_once(tmp_path, monkeypatch):
    path = hf_saved(tmp_path / "a")
    made = _count_records(monkeypatch)
    model = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(path))  # its inner load_adapter joins
    assert made == [1]
    model.load_adapter(str(path), "second")
    assert made == [2]
    fastpeft.get_peft_model(models.make_mlp(), lora())  # injection records no module state
    assert made == [2]


# ------------------------------------------------------------------------------------------ injection
def test_a_build_failing_half_way_puts_back_the_base_weights_an_init_rewrote(monkeypatch):
    base = models.make_mlp()
    before = state_of(base)
    original = LoraModel.layer_kwargs
    released = []

    def failing(self, config, key, module):
        if key == "lin1":  # lin0's layer is built already: PiSSA rewrote lin0's base weight
            raise RuntimeError("build failed")
        return original(self, config, key, module)

    def release(self):
        released.append(self)
        return self.base_layer

    monkeypatch.setattr(LoraModel, "layer_kwargs", failing)
    monkeypatch.setattr(AdapterLayer, "release", release)
    with pytest.raises(RuntimeError, match="build failed"):
        fastpeft.get_peft_model(base, lora(init_lora_weights="pissa"))
    assert_same_state(base, before)
    assert len(released) == 1  # the layer built for lin0, never swapped in, gave its base layer back


def test_a_failure_after_the_swap_deletes_the_adapter_everywhere(monkeypatch):
    model = fastpeft.get_peft_model(models.make_mlp(), lora(target_modules=["lin0"]))
    model.base_model.model.lin0.lora_A["default"].weight.requires_grad_(False)  # set by hand: must stay
    before = state_of(model)

    def fail(*_args, **_kwargs):
        raise RuntimeError("placement failed")

    # after lin1's layer and head's wrapper are in the model
    monkeypatch.setattr(Tuner, "_place_adapter", fail)
    with pytest.raises(RuntimeError, match="placement failed"):
        model.add_adapter("b", lora(modules_to_save=["head"]))
    assert_same_state(model, before)  # lin0 keeps 'default' only, lin1 and head are plain modules again
    assert model.tuner.trainable_adapters == {"default"}


@pytest.mark.parametrize("entry", ["get_peft_model", "add_adapter"])
def test_steps_a_method_adds_after_the_generic_injection_are_inside_it(monkeypatch, entry):
    model = models.make_mlp()
    if entry == "add_adapter":
        model = fastpeft.get_peft_model(model, lora())
    before = state_of(model)

    def fail(*_args, **_kwargs):
        raise RuntimeError("token wrappers failed")

    monkeypatch.setattr(token_rows, "add_token_wrappers", fail)
    with pytest.raises(RuntimeError, match="token wrappers failed"):
        if entry == "get_peft_model":
            fastpeft.get_peft_model(model, lora())
        else:
            model.add_adapter("b", lora())
    assert_same_state(model, before)


# ------------------------------------------------------------------------------------------ flags
def test_per_model_flags_live_in_one_object():
    model = fastpeft.get_peft_model(models.make_mlp(), lora(target_modules=["lin0"])).train()
    base = model.get_base_model()
    base_attrs = set(vars(base))
    model(models.mlp_inputs()).sum().backward()
    with model.disable_adapter():
        assert flags_of(model).adapters_disabled and not model.has_active_enabled_adapter
    flags = flags_of(model)
    assert flags.graph_checked and flags.watch is None and not flags.adapters_disabled
    hidden = [key for obj in (model, model.base_model, base) for key in vars(obj)
              if key.startswith("_fastpeft")]
    assert hidden == ["_fastpeft_flags"]
    assert set(vars(base)) == base_attrs
    replica = model._replicate_for_data_parallel()
    assert flags_of(replica) is not flags and flags_of(replica) == flags  # its own, for its own thread
