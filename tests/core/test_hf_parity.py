"""Behaviour HF PEFT users rely on: adapter switching and training state, modules_to_save details, Trainer.

Each test states what HF PEFT 0.21 does (checked by running the same steps with `peft`).
"""

from __future__ import annotations

import torch
from torch import nn

import fastpeft
from fastpeft import LoraConfig, get_peft_model

import models


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _mlp_with(*extra: str, **kw):
    model = get_peft_model(models.make_mlp(), LoraConfig(target_modules=["lin0"], **kw))
    for name in extra:
        model.add_adapter(name, LoraConfig(target_modules=["lin0"], **kw))
    return model


# ---------------------------------------------------------------------------------------------- set_adapter


def test_set_adapter_accepts_inference_mode():
    # HF: PeftModel.set_adapter(adapter_name, inference_mode=False); inference_mode=True activates it frozen
    model = _mlp_with("b")
    model.set_adapter("b", inference_mode=True)
    assert model.active_adapter == "b"
    assert _trainable(model) == set()


def test_set_adapter_makes_loaded_adapter_trainable(tmp_path):
    # HF: "set_adapter ... will set the specified adapter to trainable unless inference_mode is True",
    # also for an adapter that was loaded with load_adapter(is_trainable=False)
    model = _mlp_with()
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="b")
    model.set_adapter("b")
    assert _trainable(model) == {"base_model.model.lin0.lora_A.b.weight",
                                 "base_model.model.lin0.lora_B.b.weight"}


def test_delete_adapter_makes_remaining_loaded_adapter_trainable(tmp_path):
    # HF: deleting the active adapter activates the remaining one via set_adapter -> trainable
    model = _mlp_with()
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="b")
    model.delete_adapter("default")
    assert model.active_adapter == "b"
    assert _trainable(model) == {"base_model.model.lin0.lora_A.b.weight",
                                 "base_model.model.lin0.lora_B.b.weight"}


def test_set_adapter_keeps_user_unfrozen_base_params():
    # HF: set_adapter only touches adapter parameters; a base parameter the user unfroze stays trainable
    model = _mlp_with("b")
    model.base_model.model.head.weight.requires_grad_(True)
    model.set_adapter("b")
    assert model.base_model.model.head.weight.requires_grad


def test_delete_active_adapter_activates_first_remaining_in_sorted_order():
    # HF: when no active adapter remains, the alphabetically first remaining adapter becomes active
    model = _mlp_with("zeta", "alpha")
    model.delete_adapter("default")
    assert model.active_adapter == "alpha"


# -------------------------------------------------------------------------------------------- modules_to_save


class _BNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_modules_to_save_buffers_are_saved_and_loaded(tmp_path):
    # HF saves a modules_to_save copy's whole state_dict (BatchNorm running stats included) and loads it back
    torch.manual_seed(0)
    model = get_peft_model(_BNModel(), LoraConfig(target_modules=["lin"], modules_to_save=["bn"]))
    model.train()
    model(torch.randn(16, 4) * 3 + 2)  # update the trained copy's running stats
    model.eval()
    x = torch.randn(3, 4)
    expected = model(x)
    keys = set(fastpeft.get_peft_model_state_dict(model))
    assert "base_model.model.bn.running_mean" in keys and "base_model.model.bn.running_var" in keys
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = fastpeft.PeftModel.from_pretrained(_BNModel().eval(), tmp_path)
    torch.testing.assert_close(loaded(x), expected)


def test_modules_to_save_wrapper_forwards_module_attributes():
    # HF's ModulesToSaveWrapper falls back to the wrapped module's attributes (out_features, bias, ...)
    model = _mlp_with(modules_to_save=["head"])
    head = model.base_model.model.head
    assert head.out_features == 2
    assert head.bias.shape == (2,)


def test_mixed_batch_uses_each_samples_modules_to_save_copy():
    # HF: forward(adapter_names=[...]) also routes each sample through its adapter's modules_to_save copy
    # ("__base__" -> the original module)
    torch.manual_seed(0)
    model = _mlp_with("b", modules_to_save=["head"], init_lora_weights=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_()
    model.eval()
    x = models.mlp_inputs()
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "b", "__base__"])
        out_default = model(x)
        model.set_adapter("b")
        out_b = model(x)
        with model.disable_adapter():
            out_base = model(x)
    torch.testing.assert_close(mixed[0], out_default[0])
    torch.testing.assert_close(mixed[1], out_b[1])
    torch.testing.assert_close(mixed[2], out_base[2])


# ---------------------------------------------------------------------------------------------- Trainer / API


def test_trainer_keeps_input_columns_for_plain_peft_model(tmp_path):
    # HF: Trainer inspects the base model's forward for a PeftModel (task_type=None), so input_ids survive
    # remove_unused_columns; a bare forward(*args, **kwargs) would make Trainer drop every column
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(models.make_llama(), LoraConfig(target_modules=["q_proj"]))
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    trainer._set_signature_columns_if_needed()
    assert "input_ids" in trainer._signature_columns
    assert "attention_mask" in trainer._signature_columns


def test_prepare_model_for_kbit_training_leaves_checkpointing_off_for_unquantized_model():
    # HF only enables gradient checkpointing / input grads for quantized (k-bit, GPTQ, ...) models
    model = fastpeft.prepare_model_for_kbit_training(models.make_llama())
    assert not getattr(model, "is_activation_checkpointing",
                       getattr(model, "is_gradient_checkpointing", False))


# ------------------------------------------------------------------------------------- trainability on load
def _trainable_adapters(model) -> list[str]:
    return sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad})


def _steps(lib, folder) -> list[list[str]]:
    """The trainable adapters after each call of a load / add / switch sequence (HF PEFT 0.21's answers are
    the oracle: a new adapter loaded with is_trainable=True trains although inactive, adding adapters keeps
    every flag, set_adapter decides them all again)."""
    import peft

    config = (peft if lib is peft else fastpeft).LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = lib.PeftModel.from_pretrained(models.make_llama(), folder, is_trainable=True)
    seen = []
    model.load_adapter(folder, "o2", is_trainable=True)
    seen.append(_trainable_adapters(model))
    model.load_adapter(folder, "o3")  # frozen
    seen.append(_trainable_adapters(model))
    model.add_adapter("x", config)
    seen.append(_trainable_adapters(model))
    model.set_requires_grad("default", False)
    model.add_adapter("y", config)
    seen.append(_trainable_adapters(model))
    model.set_adapter("o3")
    seen.append(_trainable_adapters(model))
    return seen


def test_trainability_across_loads_matches_hf_peft(tmp_path):
    import peft

    get_peft_model(models.make_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path)
    ours, theirs = _steps(fastpeft, tmp_path), _steps(peft, tmp_path)
    assert ours == theirs
    assert ours[0] == ["default", "o2"]  # not vacuous: the loaded inactive adapter trains


def test_set_requires_grad_refused_for_prompt_learning():
    # HF: TypeError "Setting `requires_grad` is not supported for prompt learning methods like ..."
    model = get_peft_model(models.make_llama(), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    import pytest

    with pytest.raises(TypeError, match="prompt learning"):
        model.set_requires_grad("default")
