"""ShadowPEFT refusals: bad configs, targets and calls give clear errors and leave the model unchanged."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.methods.shadow import ShadowConfig, ShadowLayer
from shadow_helpers import INPUTS, build, close, make_llama_cls, unchanged_after

import models

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("options", "error", "match"), [
    (dict(task_type="SEQ_2_SEQ_LM"), ValueError, "CAUSAL_LM' and 'SEQ_CLS"),
    (dict(task_type=None), ValueError, "CAUSAL_LM' and 'SEQ_CLS"),
    (dict(task_type="CAUSAL_LM", target_modules=["q_proj"]), ValueError, "consecutive items"),
    (dict(task_type="CAUSAL_LM", target_modules=r".*\.layers\.\d+\.mlp"), ValueError, "consecutive items"),
])
def test_bad_configs_refused_model_unchanged(options, error, match):
    model = models.make_llama()
    unchanged_after(lambda: fastpeft.get_peft_model(model, ShadowConfig(**options)), model, match, error)


def test_gap_between_blocks_refused():
    model = make_llama_cls()
    config = ShadowConfig(task_type="SEQ_CLS", target_modules=["model.layers.0", "model.layers.2"])
    unchanged_after(lambda: fastpeft.get_peft_model(model, config), model, "have gaps")


def test_layers_to_transform_refused():
    """HF PEFT 0.21 ignores it for whole-block targets (every block is wrapped): refused, not ignored."""
    model = make_llama_cls()
    config = ShadowConfig(task_type="SEQ_CLS", layers_to_transform=[1, 2], layers_pattern="layers")
    unchanged_after(lambda: fastpeft.get_peft_model(model, config), model, "pick them by name",
                     NotImplementedError)


@pytest.mark.parametrize(("options", "match"), [
    (dict(r=0), "r must be a positive integer"),
    (dict(shadow_dropout=1.5), "shadow_dropout"),
    (dict(auxiliary_loss_weight=-1.0), "auxiliary_loss_weight"),
    (dict(shadow_model="org/shadow", shadow_hidden_size=16), "mirror-only"),
    (dict(target_modules=".*", layers_to_transform=[0]), "regex"),
])
def test_bad_config_values_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ShadowConfig(task_type="CAUSAL_LM", **options)


def test_unsupported_calls_refused():
    model = build(fastpeft, "default")
    for call, error, match in [
        (lambda: model.merge_and_unload(), NotImplementedError, "cannot be merged"),
        (lambda: model.base_model.merge_adapter(), NotImplementedError, "cannot be merged"),
        (lambda: model(**INPUTS, adapter_names=["default", "default"]), ValueError, "mixed-adapter"),
        (lambda: model.set_adapter(["default", "default"]), ValueError, "exactly one adapter"),
    ]:
        with pytest.raises(error, match=match):
            call()
    close(models.forward(model, INPUTS), models.forward(build(fastpeft, "default"), INPUTS), "unchanged")
    plain = models.make_llama()
    unchanged_after(lambda: fastpeft.inject_adapter_in_model(ShadowConfig(task_type="CAUSAL_LM"), plain),
                     plain, "get_peft_model")


def test_failed_second_adapter_leaves_no_trace(monkeypatch):
    """A failure after the new adapter's shadow network was built takes all of it back."""
    model = build(fastpeft, "default")
    before, hooks = models.forward(model, INPUTS), len(model.get_base_model()._forward_pre_hooks)

    def broken(self, adapter_name, config, **kwargs):
        raise RuntimeError("layer build failed")

    monkeypatch.setattr(ShadowLayer, "update_layer", broken)
    with pytest.raises(RuntimeError, match="layer build failed"):
        model.add_adapter("other", ShadowConfig(task_type="CAUSAL_LM"))
    assert list(model.peft_config) == ["default"]
    assert all("other" not in getattr(model.base_model, c) for c in ("shadow_backbone", "shadow_projection"))
    assert len(model.get_base_model()._forward_pre_hooks) == hooks
    close(models.forward(model, INPUTS), before, "unchanged")
    other_blocks = ShadowConfig(task_type="CAUSAL_LM", target_modules=["model.layers.1"])
    with pytest.raises(ValueError, match="must wrap the same blocks"):
        model.add_adapter("x", other_blocks)
    assert list(model.peft_config) == ["default"] and "x" not in model.base_model.shadow_backbone


def test_diffusion_transformer_refused():
    class TinyDiT(torch.nn.Module):  # a Diffusers-style block stack (no .layers)
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    model = TinyDiT()
    config = ShadowConfig(task_type="CAUSAL_LM", target_modules=r"transformer_blocks\.\d+")
    unchanged_after(lambda: fastpeft.get_peft_model(model, config), model, "diffusion transformers",
                     NotImplementedError)


def test_unload_shadow_of_unknown_adapter_refused():
    model = build(fastpeft, "default")
    with pytest.raises(ValueError, match="No shadow network for adapter 'nope'"):
        model.base_model.unload_shadow("nope")


def test_second_adapter_for_classification_refused():
    model = build(fastpeft, "cls")
    before = models.forward(model, INPUTS)
    with pytest.raises(ValueError, match="one adapter when any adapter is for sequence classification"):
        model.add_adapter("other", ShadowConfig(task_type="SEQ_CLS"))
    assert list(model.peft_config) == ["default"] and "other" not in model.base_model.shadow_backbone
    close(models.forward(model, INPUTS), before, "unchanged")
