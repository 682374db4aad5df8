"""disable_adapter restores training flags, no double wrapping, safe adapter names.

HF PEFT 0.21.2, checked by hand and noted per test: its disable_adapter re-enables every active adapter's
requires_grad on exit (adapters or modules_to_save copies the user froze come back trainable); its
inject_adapter_in_model on a PeftModel injects into the wrapped model, and with a name already in use silently
replaces that adapter; it accepts adapter names with spaces, '/', '__base__' or a parameter prefix ('lora_x'),
and fails with torch's KeyError on '.' in a name.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastpeft
from fastpeft import registry
from fastpeft.core.tuner import check_adapter_name
from fastpeft.errors import AdapterNameError

from cases import METHOD_CASES
from models import forward, make_bert_cls, make_mlp, mlp_inputs, perturb

ATOL = 1e-5


def config_of(lib, case):
    kwargs = copy.deepcopy(case.kwargs)
    if lib is peft:
        return getattr(peft, case.method)(**kwargs)
    return next(s.config_cls for s in registry.registered().values()
                if s.config_cls.__name__ == case.method)(**kwargs)


def flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


# -------------------------------------------------------------------- disable_adapter restores training flags
ROWS = [c for c in METHOD_CASES if c.id in ("lora-mlp-save-head", "ia3-mlp-save-head", "loha-mlp", "oft-mlp")]


def hand_tuned(case):
    """The row's model with adapter weights off their init and requires_grad changed by hand: the first
    adapter tensor and a modules_to_save copy frozen, a base bias unfrozen."""
    model = perturb(fastpeft.get_peft_model(make_mlp(), config_of(fastpeft, case)), 0, 0.1)
    prefix = registry.get_spec(model.peft_type).prefix
    next(p for n, p in sorted(model.named_parameters()) if f".{prefix}" in n).requires_grad_(False)
    for name, param in model.named_parameters():
        if ".modules_to_save.default.bias" in name or name.endswith("lin1.base_layer.bias"):
            param.requires_grad_(not param.requires_grad)
    return model


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.id)
def test_disable_adapter_restores_hand_set_flags(case, tmp_path):
    model = hand_tuned(case)
    before, adapted = flags(model), forward(model, mlp_inputs())
    assert before != flags(perturb(fastpeft.get_peft_model(make_mlp(), config_of(fastpeft, case)), 0, 0.1))
    model.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(make_mlp(), str(tmp_path))
    with model.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(forward(model, mlp_inputs()), forward(make_mlp(), mlp_inputs()), atol=ATOL,
                                   rtol=ATOL)
        torch.testing.assert_close(forward(model, mlp_inputs()), forward(theirs, mlp_inputs()),
                                   atol=ATOL, rtol=ATOL)
    assert flags(model) == before
    torch.testing.assert_close(forward(model, mlp_inputs()), adapted, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(forward(theirs, mlp_inputs()), adapted, atol=ATOL, rtol=ATOL)


def test_disable_adapter_restores_flags_after_an_exception():
    model = hand_tuned(ROWS[0])
    model.add_adapter("other", config_of(fastpeft, ROWS[0]))
    model.set_requires_grad("other", True)  # an inactive adapter made trainable by hand
    before, adapted = flags(model), forward(model, mlp_inputs())
    with pytest.raises(RuntimeError, match="inside"):
        with model.disable_adapter():
            assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
            raise RuntimeError("failure inside the block")
    assert flags(model) == before
    torch.testing.assert_close(forward(model, mlp_inputs()), adapted, atol=ATOL, rtol=ATOL)


def test_nested_disable_adapter_keeps_adapters_off_until_the_outer_block_ends():
    model = hand_tuned(ROWS[0])
    before, adapted, base = flags(model), forward(model, mlp_inputs()), forward(make_mlp(), mlp_inputs())
    with model.disable_adapter():
        with model.disable_adapter():
            torch.testing.assert_close(forward(model, mlp_inputs()), base, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(forward(model, mlp_inputs()), base, atol=ATOL, rtol=ATOL)
    assert flags(model) == before
    torch.testing.assert_close(forward(model, mlp_inputs()), adapted, atol=ATOL, rtol=ATOL)


def test_disable_adapter_restores_flags_of_prompt_methods():
    model = fastpeft.get_peft_model(make_bert_cls(), fastpeft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=4))
    copy_param = next(p for n, p in model.named_parameters() if ".modules_to_save.default." in n)
    copy_param.requires_grad_(False)
    model.get_base_model().bert.embeddings.word_embeddings.weight.requires_grad_(True)
    before = flags(model)
    with pytest.raises(KeyError):
        with model.disable_adapter():
            raise KeyError("inside")
    assert flags(model) == before


def test_hf_disable_adapter_does_not_restore_hand_frozen_adapters():
    """The HF PEFT behaviour fastpeft deliberately differs from (so the tests above can fail)."""
    theirs = peft.get_peft_model(make_mlp(), peft.LoraConfig(target_modules=["lin0"]))
    frozen = theirs.base_model.model.lin0.lora_A["default"].weight
    frozen.requires_grad_(False)
    with theirs.disable_adapter():
        pass
    assert frozen.requires_grad


# ----------------------------------------------------------------------------------------- no double wrapping
def lora(lib, **kwargs):
    return lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **kwargs)


def test_inject_adapter_in_model_on_peft_model_points_to_add_adapter():
    model = fastpeft.get_peft_model(make_mlp(), lora(fastpeft))
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="add_adapter"):
        fastpeft.inject_adapter_in_model(lora(fastpeft), model, adapter_name="x")
    assert list(model.state_dict()) == keys and list(model.peft_config) == ["default"]


def test_inject_adapter_in_model_twice_under_one_name_is_refused():
    model = fastpeft.inject_adapter_in_model(lora(fastpeft), make_mlp())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        fastpeft.inject_adapter_in_model(lora(fastpeft, r=2), model)
    assert list(model.peft_config) == ["default"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_inject_adapter_in_model_of_another_method_is_refused():
    model = fastpeft.inject_adapter_in_model(lora(fastpeft), make_mlp())
    with pytest.raises(ValueError, match="LORA"):
        fastpeft.inject_adapter_in_model(fastpeft.IA3Config(target_modules=["lin1"], feedforward_modules=[]),
                                         model, adapter_name="ia3")
    assert list(model.peft_config) == ["default"]


def test_inject_adapter_in_model_side_by_side_matches_hf():
    """A second name adds a second adapter (diffusers loads several LoRAs so): both configs kept, as HF
    PEFT."""
    models = {}
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.inject_adapter_in_model(lora(lib), make_mlp())
        model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"], r=2), model,
                                            adapter_name="two")
        models[lib] = perturb(model, 0, 0.1, wanted=lambda n: "lora_" in n)
    ours, theirs = models[fastpeft], models[peft]
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default", "two"]
    torch.testing.assert_close(forward(ours, mlp_inputs()), forward(theirs, mlp_inputs()),
                               atol=ATOL, rtol=ATOL)
    for name in ("default", "two"):
        a = fastpeft.get_peft_model_state_dict(ours, adapter_name=name)
        b = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_get_peft_model_on_injected_model_points_to_add_adapter():
    model = fastpeft.inject_adapter_in_model(lora(fastpeft), make_mlp())
    with pytest.raises(ValueError, match="add_adapter"):
        fastpeft.get_peft_model(model, lora(fastpeft))


# ----------------------------------------------------------------------------------------- safe adapter names
# names used across the test-suite and by fastpeft itself (create_arrow_model's task_<i>), plus edge cases
# allowed
ALLOWED = ["default", "other", "pokemon", "task_0", "arrow_router", "a0", "dora2", "a-1", "-x", "_x", "X9",
           "LORA_upper", "adapter_lora_"]
PATH_LIKE = ["", ".", "..", ".x", "adapter.1", "a.b", "a/b", "../x", "a\\b", "a b", " x", "x\n", "é", "a:b"]


@pytest.mark.parametrize("name", ALLOWED)
def test_allowed_names(name):
    check_adapter_name(name)


@pytest.mark.parametrize("name", PATH_LIKE + [None, 1, b"x"])
def test_path_like_or_non_string_names_are_refused(name):
    with pytest.raises(AdapterNameError, match="letters, digits"):
        check_adapter_name(name)


def test_names_starting_with_a_registered_prefix_are_refused():
    prefixes = {spec.prefix for spec in registry.registered().values() if spec.prefix}
    assert {"lora_", "hada_", "lokr_", "ia3_", "prompt_"} <= prefixes  # taken from the registry, all methods
    for prefix in sorted(prefixes):
        with pytest.raises(AdapterNameError, match=f"starts with '{prefix}'"):
            check_adapter_name(prefix + "x")


def test_reserved_mixed_batch_name_is_refused():
    with pytest.raises(AdapterNameError, match="reserved"):
        check_adapter_name("__base__")


def test_hf_also_fails_on_dotted_names():
    """Why '.' stays refused: torch refuses it in module names, so HF PEFT cannot build such an adapter
    either."""
    with pytest.raises(KeyError, match="module name"):
        peft.get_peft_model(make_mlp(), peft.LoraConfig(target_modules=["lin0"]), adapter_name="adapter.1")


ENTRY_POINTS = {
    "get_peft_model": lambda name, folder: fastpeft.get_peft_model(
        make_mlp(), lora(fastpeft), adapter_name=name),
    "inject_adapter_in_model": lambda name, folder: fastpeft.inject_adapter_in_model(
        lora(fastpeft), make_mlp(), adapter_name=name),
    "add_adapter": lambda name, folder: fastpeft.get_peft_model(make_mlp(), lora(fastpeft)).add_adapter(
        name, lora(fastpeft)),
    "load_adapter": lambda name, folder: fastpeft.get_peft_model(make_mlp(), lora(fastpeft)).load_adapter(
        folder, adapter_name=name),
    "from_pretrained": lambda name, folder: fastpeft.PeftModel.from_pretrained(
        make_mlp(), folder, adapter_name=name),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name", ["lora_x", "__base__", "adapter.1", "a b"])
def test_every_entry_point_refuses_bad_names(entry, name, tmp_path):
    fastpeft.get_peft_model(make_mlp(), lora(fastpeft)).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterNameError, match="Invalid adapter name"):
        ENTRY_POINTS[entry](name, str(tmp_path))
    with pytest.raises(ValueError):  # also the builtin type HF PEFT code catches
        ENTRY_POINTS[entry](name, str(tmp_path))


def test_allowed_name_round_trips_with_hf(tmp_path):
    ours = perturb(fastpeft.get_peft_model(make_mlp(), lora(fastpeft), adapter_name="a-1"), 0, 0.1)
    ours.save_pretrained(str(tmp_path))  # a non-default adapter goes to its own sub-folder
    theirs = peft.PeftModel.from_pretrained(make_mlp(), str(tmp_path / "a-1"), adapter_name="a-1")
    torch.testing.assert_close(forward(theirs, mlp_inputs()), forward(ours, mlp_inputs()),
                               atol=ATOL, rtol=ATOL)
    theirs.save_pretrained(str(tmp_path / "hf"))
    back = fastpeft.PeftModel.from_pretrained(make_mlp(), str(tmp_path / "hf" / "a-1"), adapter_name="a-1")
    torch.testing.assert_close(forward(back, mlp_inputs()), forward(ours, mlp_inputs()), atol=ATOL, rtol=ATOL)
