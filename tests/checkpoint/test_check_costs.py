"""The cheaper paths of the load / save / training checks (benchmarks/README.md) keep their results.

- `fingerprint.module_entries` (one gather per weight, one host copy per device) gives the sums the
  fingerprint defines: 64 evenly strided elements in row-major order, summed exactly; checked against a direct
  computation here.
- `checks._checkpointing` reads only the modules that carry a `gradient_checkpointing` flag after its first
  call: switching reentrant checkpointing on after some training steps must still make the adapters train,
  with the gradients HF PEFT gives with non-reentrant checkpointing.
- A load nested in `from_pretrained` records nothing again: a failure inside it still leaves the base as it
  was.
"""

from __future__ import annotations

import json
import math
import os

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import fastpeft
from fastpeft.checkpoint import fingerprint
from fastpeft.errors import AdapterLoadError

import models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def direct_entry(weight: torch.Tensor) -> dict:
    """The fingerprint entry by its definition, element by element."""
    flat = weight.detach().reshape(-1).to(torch.float64)
    count = min(64, flat.numel())
    values = [flat[i * flat.numel() // count].item() for i in range(count)]
    return {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "sum": math.fsum(values), "abs": math.fsum(abs(v) for v in values),
            "alt": math.fsum(v if i % 2 == 0 else -v for i, v in enumerate(values))}


def test_batched_entries_match_the_definition():
    torch.manual_seed(0)
    layers = [nn.Linear(70, 300), nn.Linear(3, 5), nn.Linear(1, 1), nn.Linear(9, 7).to(torch.bfloat16),
              nn.Linear(9, 9).to(torch.float16), nn.Linear(6, 11).double(), nn.Embedding(13, 5)]
    transposed = nn.Linear(6, 10)
    transposed.weight = nn.Parameter(transposed.weight.detach().t().contiguous().t())  # not contiguous
    scalar = nn.Module()
    scalar.w = nn.Parameter(torch.tensor(-2.5))
    layers += [transposed, scalar]
    entries = fingerprint.module_entries([*layers, None])
    assert entries[-1] is None
    for layer, entry in zip(layers, entries):
        weight = next(layer.parameters())
        assert entry == direct_entry(weight), layer
        assert fingerprint.module_entry(layer) == entry


def test_saved_fingerprint_matches_the_definition(tmp_path):
    model = fastpeft.get_peft_model(models.make_mlp(),
                                    fastpeft.LoraConfig(target_modules=["lin0", "lin1"], r=4))
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        stored = json.loads(fh.metadata()[fingerprint.METADATA_KEY])["modules"]
    base = model.get_base_model()
    assert stored == {name: direct_entry(getattr(base, name).get_base_layer().weight)
                      for name in ("lin0", "lin1")}


def tiny_vit():
    """Main input `pixel_values`: transformers does not make the embeddings' output require grad for it."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3, attn_implementation="eager")
    models._seeded()
    return ViTForImageClassification(cfg)


def lora_grads_after_late_checkpointing(lib, reentrant: bool) -> dict[str, torch.Tensor]:
    """Two training steps without checkpointing, then reentrant (or not) checkpointing; grads of the third."""
    model = lib.get_peft_model(tiny_vit(), lib.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                          init_lora_weights=False))
    model.train()
    torch.manual_seed(5)
    pixels, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    for _ in range(2):
        model(pixel_values=pixels, labels=labels).loss.backward()
    model.zero_grad()
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(pixel_values=pixels, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_checkpointing_switched_on_after_training_started_still_trains_adapters():
    theirs = lora_grads_after_late_checkpointing(peft, reentrant=False)
    ours = lora_grads_after_late_checkpointing(fastpeft, reentrant=True)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name, grad in ours.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, theirs[name], atol=1e-6, rtol=1e-5)


def test_failure_inside_from_pretrained_nested_load_leaves_base_unchanged(tmp_path):
    """from_pretrained's inner load_adapter records nothing itself: the enclosing load restores the base."""
    saved = tmp_path / "a"
    peft.get_peft_model(models.make_mlp(), peft.LoraConfig(target_modules=["lin0", "lin1"], r=4,
                                                           modules_to_save=["head"])
                        ).save_pretrained(str(saved))
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated: fails inside the nested load, after injection
    base = models.make_mlp()
    base.train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules_before = dict(base.named_modules())
    grads_before = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(AdapterLoadError):
        fastpeft.PeftModel.from_pretrained(base, str(saved))
    assert dict(base.named_modules()) == modules_before
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads_before
    assert base.training and all(m.training for m in base.modules())
    assert base.state_dict().keys() == before.keys()
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert "peft_config" not in base.__dict__
