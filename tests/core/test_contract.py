"""Contract properties 1-8 (docs/architecture.md; shared ARCHITECTURE.md sec. 5) for every row of
METHOD_CASES."""

from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft import registry
from fastpeft.core.layer import AdapterHolder

from cases import METHOD_CASES, build, config_class, perturb
from models import MODELS, forward

ATOL = 1e-5


def base_outputs(case):
    factory, inputs_fn = MODELS[case.model]
    return forward(factory(), inputs_fn())


def expected_trainable(name: str, case) -> bool:
    """Independent statement of what may train: the method's adapter tensors (named with its registered
    prefix, e.g. `lora_`), modules_to_save copies, biases if asked."""
    prefix = registry.get_spec(config_class(case.method).PEFT_TYPE).prefix
    if f".{prefix}" in name or ".modules_to_save." in name:
        return True
    bias = case.kwargs.get("bias", "none")
    return bias != "none" and name.endswith("bias") and ".original_module." not in name


@pytest.fixture(params=METHOD_CASES, ids=lambda c: c.id)
def case(request):
    return request.param


def test_identity_at_init(case):
    model, inputs = build(case)
    # identity_init=False: methods whose fresh adapter already changes the outputs (e.g. VB-LoRA's random
    # bank)
    assert torch.allclose(forward(model, inputs), base_outputs(case), atol=ATOL) == case.identity_init


def test_only_adapter_params_train_and_step_changes_outputs(case):
    model, inputs = build(case)
    base_before = {n: p.detach().clone() for n, p in MODELS[case.model][0]().named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all(expected_trainable(n, case) for n in trainable), sorted(trainable)
    before = forward(model, inputs)
    model.train()
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    logits.float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    assert not torch.allclose(forward(model, inputs), before, atol=1e-6)
    frozen = {n: p for n, p in model.get_base_model().named_parameters() if not p.requires_grad}
    for name, param in frozen.items():
        plain = name.replace(".base_layer", "").replace(".original_module", "")
        if plain in base_before:
            assert torch.equal(param, base_before[plain]), f"base weight {name} changed"


def test_save_load_roundtrip(case, tmp_path):
    model, inputs = build(case, seed_adapter=True)
    expected = forward(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), tmp_path)
    assert torch.allclose(forward(loaded, inputs), expected, atol=ATOL)
    sd_a = fastpeft.get_peft_model_state_dict(model)
    sd_b = fastpeft.get_peft_model_state_dict(loaded)
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded adapters must be frozen by default"
    trainable = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def _prefix(case) -> str:
    return "." + registry.get_spec(config_class(case.method).PEFT_TYPE).prefix


def _target_weights(model, case):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if ".base_layer." in n and _prefix(case) not in n}


def test_merge_unmerge_merge_and_unload(case):
    model, inputs = build(case, seed_adapter=True)
    expected = forward(model, inputs)
    if not case.mergeable:
        with pytest.raises((NotImplementedError, ValueError), match="(?i)merg"):  # a refusal that says why
            model.merge_adapter()
        return
    if "unmerge" in case.refused:  # merging works, taking it back is refused with an error that says so
        model.merge_adapter()
        assert torch.allclose(forward(model, inputs), expected, atol=ATOL)
        with pytest.raises(NotImplementedError, match="(?i)unmerg"):
            model.unmerge_adapter()
        assert torch.allclose(forward(model, inputs), expected, atol=ATOL)
        merged = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, AdapterHolder) for m in merged.modules())
        assert torch.allclose(forward(merged, inputs), expected, atol=ATOL)
        return
    before = _target_weights(model, case)
    model.merge_adapter()
    assert torch.allclose(forward(model, inputs), expected, atol=ATOL)
    model.merge_adapter()  # second merge is a no-op
    assert torch.allclose(forward(model, inputs), expected, atol=ATOL)
    model.unmerge_adapter()
    after = _target_weights(model, case)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert torch.allclose(forward(model, inputs), expected, atol=ATOL)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, AdapterHolder) for m in merged.modules())
    assert torch.allclose(forward(merged, inputs), expected, atol=ATOL)


@pytest.mark.parametrize("case", [c for c in METHOD_CASES if c.mergeable], ids=lambda c: c.id)
def test_safe_merge_refuses_nan(case):
    model, _ = build(case, seed_adapter=True)
    name, param = next((n, p) for n, p in model.named_parameters() if _prefix(case) in n and p.requires_grad)
    with torch.no_grad():
        param.fill_(float("nan"))
    before = _target_weights(model, case)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    layer_prefix = name.split(_prefix(case))[0]
    for key, value in _target_weights(model, case).items():
        if key.startswith(layer_prefix):
            assert torch.equal(value, before[key]), f"{key} modified by a refused safe merge"


def test_unload_gives_base_model(case):
    model, inputs = build(case, seed_adapter=True)
    reference = MODELS[case.model][0]()
    unloaded = model.unload()
    assert not any(isinstance(m, AdapterHolder) for m in unloaded.modules())
    ref_types = {n: type(m) for n, m in reference.named_modules()}
    got_types = {n: type(m) for n, m in unloaded.named_modules()}
    assert ref_types == got_types
    saved_modules = tuple(case.kwargs.get("modules_to_save") or ()) + (
        ("classifier", "score") if case.kwargs.get("task_type") == "SEQ_CLS" else ())
    ref_sd = reference.state_dict()
    for key, value in unloaded.state_dict().items():
        if any(key.startswith(m + ".") or f".{m}." in key for m in saved_modules):
            continue  # as HF PEFT, unload keeps the trained copy of modules_to_save
        if case.kwargs.get("bias", "none") != "none" and key.endswith("bias"):
            continue  # biases were perturbed as trainable
        assert torch.equal(value, ref_sd[key]), key
    if not saved_modules and case.kwargs.get("bias", "none") == "none":
        assert torch.allclose(forward(unloaded, inputs), base_outputs(case), atol=ATOL)


def test_disable_adapter_context(case):
    model, inputs = build(case, seed_adapter=True)
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    adapted = forward(model, inputs)
    with model.disable_adapter():
        disabled = forward(model, inputs)
    if case.kwargs.get("bias", "none") == "none":
        assert torch.allclose(disabled, base_outputs(case), atol=ATOL)
    assert not torch.allclose(disabled, adapted, atol=1e-6)
    assert torch.allclose(forward(model, inputs), adapted, atol=ATOL)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def other_config(case):
    """A second adapter like the first (without its bias setting; inference-only where one adapter trains)."""
    kwargs = {k: v for k, v in copy.deepcopy(case.kwargs).items() if k != "bias"}
    if case.one_trainable:
        kwargs["inference_mode"] = True
    return config_class(case.method)(**kwargs)


def test_multiple_adapters_add_set_delete(case, tmp_path):
    model, inputs = build(case, seed_adapter=True)
    first = forward(model, inputs)
    model.add_adapter("other", other_config(case))
    assert model.active_adapter == "default"
    assert torch.allclose(forward(model, inputs), first, atol=ATOL), (
        "adding an adapter must not change outputs")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("other")
    assert any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    perturb(model, seed=1, only=".other")  # (bias="all" leaves base biases trainable too, as HF PEFT)
    second = forward(model, inputs)
    assert not torch.allclose(second, first, atol=1e-6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    model.set_adapter("default")
    assert torch.allclose(forward(model, inputs), first, atol=1e-4)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in k for k in model.state_dict())
    assert torch.allclose(forward(model, inputs), first, atol=ATOL)
    if case.kwargs.get("bias", "none") == "none":  # else "second" also includes default's trained biases
        loaded = fastpeft.PeftModel.from_pretrained(MODELS[case.model][0](), tmp_path / "other",
                                                    adapter_name="other")
        assert torch.allclose(forward(loaded, inputs), second, atol=ATOL)


def _rows(inputs, i):
    if isinstance(inputs, dict):
        return {k: v[i:i + 1] for k, v in inputs.items()}
    return inputs[i:i + 1]


def _with_names(inputs, names):
    return ({**inputs, "adapter_names": names} if isinstance(inputs, dict)
            else {"x": inputs, "adapter_names": names})


def test_mixed_batch_equals_each_sample_alone(case):
    model, inputs = build(case, seed_adapter=True)
    model.add_adapter("other", other_config(case))
    model.set_adapter("other")  # trainable while perturbed, so that perturb finds its tensors
    perturb(model, seed=1, only=".other")
    model.set_adapter("default")
    batch = (next(iter(inputs.values())) if isinstance(inputs, dict) else inputs).shape[0]  # first: the batch
    names = (["default", "other", "__base__"] * batch)[:batch]
    if case.model == "mha":  # LoRA on nn.MultiheadAttention has no per-sample path, as in HF PEFT
        with pytest.raises(TypeError, match="mixed"):
            forward(model, _with_names(inputs, names))
        return
    if case.model in ("emb",):
        mixed = forward(model, {"input_ids": inputs, "adapter_names": names})
    else:
        mixed = forward(model, _with_names(inputs, names))
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = forward(model, _rows(inputs, i))
        else:
            model.set_adapter(name)
            alone = forward(model, _rows(inputs, i))
        assert torch.allclose(mixed[i:i + 1], alone, atol=ATOL), (i, name)
