"""nn.DataParallel replicas of a PeftModel must run their own weights (peft_model.py
`_replicate_for_data_parallel`).

A plain PeftModel (no task_type) gives each instance a `forward` with the base model's signature (for
Trainer's column filtering), stored in the instance `__dict__` as a method bound to that instance.
DataParallel (what transformers' Trainer uses on a multi-GPU machine without torchrun) builds replicas by
copying `__dict__`, so every replica's `forward` ran the original module on the first device's weights.
torch's `replicate` broadcasts with CUDA, so the replicas are built here the way it builds them (same
`_replicate_for_data_parallel` calls, same tree, parameter copies as non-leaf tensors) on the CPU, and
compared with HF PEFT's replicas.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastpeft  # noqa: E402

from models import make_llama  # noqa: E402


def _replica(model: nn.Module, scale: float) -> nn.Module:
    """One replica as torch.nn.parallel.replicate builds it, its parameters `scale` x the original's (standing
    in for another device's copy, so that running the original's weights shows)."""
    copies = {id(m): m._replicate_for_data_parallel() for m in model.modules()}
    for module in model.modules():
        replica = copies[id(module)]
        for key, child in module._modules.items():
            replica._modules[key] = None if child is None else copies[id(child)]
        for key, param in module._parameters.items():
            if param is None:
                replica._parameters[key] = None
            else:
                setattr(replica, key, param * scale)  # non-leaf, as a broadcast copy
    return copies[id(model)]


def _config(lib):
    # no task_type: a plain PeftModel, the class that gets the per-instance forward
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.mark.parametrize("hf_saves", [True, False])
def test_replica_runs_its_own_weights_as_in_hf(tmp_path, hf_saves):
    lib = peft if hf_saves else fastpeft
    torch.manual_seed(0)
    lib.get_peft_model(make_llama(), _config(lib)).save_pretrained(str(tmp_path))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    logits = {}
    for side in (peft, fastpeft):
        model = side.PeftModel.from_pretrained(make_llama(), str(tmp_path)).eval()
        with torch.no_grad():
            logits[side] = (model(input_ids=ids).logits, _replica(model, 0.5)(input_ids=ids).logits)
    torch.testing.assert_close(logits[fastpeft][0], logits[peft][0])
    torch.testing.assert_close(logits[fastpeft][1], logits[peft][1])
    assert not torch.allclose(logits[fastpeft][1], logits[fastpeft][0])  # the replica's weights were used
