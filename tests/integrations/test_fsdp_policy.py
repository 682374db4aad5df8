"""fsdp_auto_wrap_policy (peft.utils.other): which modules become FSDP units, as HF PEFT's policy decides."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.utils.other import fsdp_auto_wrap_policy

import models


def _wrapped(lib, model) -> set[str]:
    policy = lib.utils.other.fsdp_auto_wrap_policy(model)
    return {name for name, module in model.named_modules() if name and policy(module, False, 0)}


def _lora(lib):
    torch.manual_seed(0)
    return lib.get_peft_model(models.make_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_blocks_and_trainable_leaves_like_hf():
    ours, theirs = _lora(fastpeft), _lora(peft)
    wrapped = _wrapped(fastpeft, ours)
    assert wrapped == _wrapped(peft, theirs)
    assert any(n.endswith("layers.0") for n in wrapped)  # a LlamaDecoderLayer
    assert any(n.endswith("q_proj.lora_A.default") for n in wrapped)  # a trainable leaf
    assert not any(n.endswith("q_proj.base_layer") for n in wrapped)  # frozen


def test_environment_names_the_block_classes(monkeypatch):
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaRMSNorm")
    wrapped = _wrapped(fastpeft, _lora(fastpeft))
    assert (any(n.endswith("input_layernorm") for n in wrapped)
            and not any(n.endswith("layers.0") for n in wrapped))
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "NoSuchBlock")
    with pytest.raises(ValueError, match="NoSuchBlock"):
        fsdp_auto_wrap_policy(_lora(fastpeft))
