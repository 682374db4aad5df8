"""Fixes from this session's review of the reliability checks.

- With activation checkpointing on, the input-grad fix is applied once, whatever marker the installed transformers
  leaves (transformers 4.x records `_require_grads_hook`, 5.x `_require_grads_hooks`): no hook per training step.
- An out-of-memory error during a load keeps its type (callers catch it to retry on a smaller device) while the
  model is still restored; other foreign errors become AdapterLoadError.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastpeft
from fastpeft.checkpoint import keys
from fastpeft.errors import AdapterLoadError

import models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _enable_like_transformers_4(base):
    """transformers 4.x's enable_input_require_grads: one forward hook, kept under `_require_grads_hook`."""
    calls = []

    def enable():
        calls.append(1)
        hook = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        base.__dict__["_require_grads_hook"] = hook

    base.enable_input_require_grads = enable
    return calls


@pytest.mark.parametrize("marker", ["v4", "none"])
def test_input_grad_fix_is_applied_once_with_checkpointing(marker):
    base = models.make_llama()
    calls = _enable_like_transformers_4(base)
    if marker == "none":  # an enable that records nothing at all
        base.enable_input_require_grads = lambda: calls.append(1)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(**models.llama_inputs()).logits.sum().backward()
    calls_after_first, hooks_after_first = len(calls), len(base.get_input_embeddings()._forward_hooks)
    for _ in range(3):
        model(**models.llama_inputs()).logits.sum().backward()
    assert len(calls) == calls_after_first  # enabled at most once by fastpeft, not once per step
    assert len(base.get_input_embeddings()._forward_hooks) == hooks_after_first


@pytest.mark.parametrize("error", [MemoryError, torch.OutOfMemoryError, KeyError])
def test_load_failure_keeps_oom_type_and_restores_the_model(tmp_path, monkeypatch, error):
    trained = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    models.perturb(trained)
    trained.save_pretrained(tmp_path)
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing(*args, **kwargs):
        raise error("simulated")

    monkeypatch.setattr(keys, "_model_tensors", failing)
    expected = AdapterLoadError if error is KeyError else error
    with pytest.raises(expected):
        model.load_adapter(tmp_path, adapter_name="other")
    assert "other" not in model.peft_config
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_save_without_folder_locks_still_writes_the_adapter(tmp_path, monkeypatch, caplog):
    """Filesystems without flock (some NFS / FUSE mounts) refuse the lock: the save goes on, logged."""
    import errno

    from fastpeft.checkpoint import atomic

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    models.perturb(model)
    with caplog.at_level("WARNING", logger="fastpeft.checkpoint.atomic"):
        model.save_pretrained(tmp_path)
    assert "without the lock" in caplog.text
    loaded = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path)
    torch.testing.assert_close(models.forward(loaded, models.llama_inputs()),
                               models.forward(model.eval(), models.llama_inputs()))


class TwoBranch(torch.nn.Module):
    """A vision-like branch (adapted) and a text-like branch; a batch may use only the text one."""

    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Linear(8, 8)
        self.text = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x, image=None):
        h = self.text(x)
        if image is not None:
            h = h + self.vision(image)
        return self.head(h)


def test_first_training_batch_that_skips_the_adapted_branch_warns_and_training_goes_on(caplog):
    """HF PEFT trains such models; fastpeft must not mistake a skipped branch for starved checkpointing."""
    import peft

    def build(lib):
        models._seeded()
        model = lib.get_peft_model(TwoBranch(), lib.LoraConfig(target_modules=["vision"], modules_to_save=["head"],
                                                              init_lora_weights=False))
        return model.train()

    ours, theirs = build(fastpeft), build(peft)
    x, image = torch.randn(3, 8), torch.randn(3, 8)
    with caplog.at_level("WARNING", logger="fastpeft.core.checks"):
        ours(x).sum().backward()  # text-only batch: no adapter layer runs
    theirs(x).sum().backward()
    assert "No adapter layer ran" in caplog.text
    ours(x, image).sum().backward()
    theirs(x, image).sum().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in grads)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name])
    assert not ours.__dict__.get("_fastpeft_watch")  # hooks removed
    assert all(not layer._forward_hooks for layer in ours.tuner.adapter_layers())
