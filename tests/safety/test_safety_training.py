"""Training mistakes HF PEFT 0.21.2 lets pass silently, each an error or a fix here.

Every test builds the same adapter in HF PEFT (the oracle) and fastpeft and compares outputs / gradients
/ files; each docstring says what HF PEFT does in the same situation (checked against the installed 0.21.2).
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastpeft
from fastpeft.core import checks
from fastpeft.core.flags import flags_of
from fastpeft.errors import AdapterStateError

import models

ATOL = 1e-5


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def lora_llama(lib, base=None, **extra):
    kw = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False, **extra)
    return lib.get_peft_model(base if base is not None else models.make_llama(), lib.LoraConfig(**kw))


def hf_saved(tmp_path, **extra):
    """An HF PEFT LoRA adapter saved to `tmp_path / 'hf'` and its (eval) model."""
    theirs = lora_llama(peft, **extra).eval()
    theirs.save_pretrained(tmp_path / "hf")
    return theirs, tmp_path / "hf"


# ------------------------------------------------------------------- mixed batches with unknown adapter names
def test_mixed_batch_unknown_adapter_is_an_error_and_base_stays_allowed(tmp_path):
    """HF PEFT (eval mode) raises too ("Trying to infer with non-existing adapter(s)"); in train mode it
    refuses adapter_names altogether. Here: an unknown name is an error naming it; "__base__" rows match HF
    PEFT's."""
    theirs, folder = hf_saved(tmp_path)
    ours = fastpeft.PeftModel.from_pretrained(models.make_llama(), folder).eval()
    inputs = models.llama_inputs()
    with pytest.raises(ValueError, match="non-existing"):
        theirs(**inputs, adapter_names=["default", "nope"])
    for call in (ours, lambda **kw: ours.generate(**kw, max_new_tokens=2, do_sample=False)):
        with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
            call(**inputs, adapter_names=["default", "nope"])
    names = ["default", "__base__"]
    close(ours(**inputs, adapter_names=names).logits, theirs(**inputs, adapter_names=names).logits)
    base = models.forward(models.make_llama(), inputs)
    close(ours(**inputs, adapter_names=names).logits[1], base[1])


# -------------------------------------------------------------------------- checkpointing without input grads
def make_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3, attn_implementation="eager")
    models._seeded()
    return ViTForImageClassification(cfg).eval()


def vit_grads(lib, reentrant: bool, enable_before_wrap: bool):
    base = make_vit()
    kwargs = {"use_reentrant": reentrant}
    if enable_before_wrap:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    cfg = lib.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False,
                         modules_to_save=["classifier"])
    model = lib.get_peft_model(base, cfg)
    if not enable_before_wrap:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    torch.manual_seed(5)
    pixels, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    model(pixel_values=pixels, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("enable_before_wrap", [True, False], ids=["before_wrap", "after_wrap"])
def test_reentrant_checkpointing_still_trains_adapters(enable_before_wrap):
    """HF PEFT: with reentrant checkpointing switched on after wrapping a ViT (main input `pixel_values`, so
    transformers does not call enable_input_require_grads; HF PEFT only does at wrap time), every LoRA
    gradient is None while the classifier trains: the adapters silently never learn. fastpeft makes the
    embeddings' output require grad at the first training forward, so the gradients equal HF PEFT's
    non-reentrant ones."""
    theirs = vit_grads(peft, reentrant=False, enable_before_wrap=enable_before_wrap)
    ours = vit_grads(fastpeft, reentrant=True, enable_before_wrap=enable_before_wrap)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name, grad in ours.items():
        assert grad is not None, name
        close(grad, theirs[name])


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
    """With activation checkpointing on, the input-grad fix is applied once, whatever marker the installed
    transformers leaves (4.x records `_require_grads_hook`, 5.x `_require_grads_hooks`): no hook per step."""
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


class CheckpointedMLP(nn.Module):
    """A plain torch model that checkpoints its hidden block itself (reentrant), behind a frozen input
    layer."""

    def __init__(self):
        super().__init__()
        self.inner = models.MLP()

    def forward(self, x):
        inner = self.inner
        h = inner.act(inner.lin0(x))
        h = checkpoint(lambda t: inner.act(inner.lin1(t)), h, use_reentrant=True)
        return inner.head(h)


def test_training_forward_that_bypasses_the_adapters_is_an_error():
    """HF PEFT: the backward passes (the trained head gets gradients) and lin1's LoRA gets None - silently.
    fastpeft cannot see a hand-made checkpoint, so it checks the first training forward's autograd graph and
    raises with the fix when no trainable adapter parameter is in it."""
    models._seeded()
    theirs = peft.get_peft_model(CheckpointedMLP(), peft.LoraConfig(target_modules=["lin1"],
                                                                     modules_to_save=["head"])).train()
    theirs(models.mlp_inputs()).sum().backward()
    assert all(p.grad is None for n, p in theirs.named_parameters() if "lora_" in n)

    models._seeded()
    ours = fastpeft.get_peft_model(CheckpointedMLP(), fastpeft.LoraConfig(target_modules=["lin1"],
                                                                          modules_to_save=["head"])).train()
    with pytest.raises(AdapterStateError,
                       match="does not depend on any of the 2 trainable adapter parameters"):
        ours(models.mlp_inputs())
    with torch.no_grad():
        ours(models.mlp_inputs())  # inference is not checked
    x = models.mlp_inputs().requires_grad_(True)  # the fix: the checkpointed block's input requires grad
    ours(x).sum().backward()
    lora = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    x = models.mlp_inputs().requires_grad_(True)
    theirs.zero_grad(set_to_none=True)
    theirs(x).sum().backward()
    for name, grad in lora.items():
        close(grad, dict(theirs.named_parameters())[name].grad)


def test_graph_check_runs_once():
    """With the adapters in the graph the check passes silently, once; later forwards skip it."""
    models._seeded()
    ours = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=["lin1"])).train()
    x = models.mlp_inputs()
    assert checks.before_training_forward(ours)
    ours(x).sum().backward()
    assert not checks.before_training_forward(ours)


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
    def build(lib):
        models._seeded()
        config = lib.LoraConfig(target_modules=["vision"], modules_to_save=["head"], init_lora_weights=False)
        model = lib.get_peft_model(TwoBranch(), config)
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
    assert flags_of(ours).watch is None  # hooks removed
    assert all(not layer._forward_hooks for layer in ours.tuner.adapter_layers())


# ---------------------------------------------------------------------------------- training a frozen adapter
def test_training_a_frozen_adapter_is_an_error(tmp_path, capsys):
    """HF PEFT: after from_pretrained(is_trainable=False) and .train() the forward runs and the loss has no
    gradient ("element 0 of tensors does not require grad" at backward, or nothing at all when the optimizer
    was built over model.parameters()). fastpeft raises at the training forward; inference keeps working."""
    theirs, folder = hf_saved(tmp_path)
    ours = fastpeft.PeftModel.from_pretrained(models.make_llama(), folder)
    inputs = models.llama_inputs()
    expected = theirs(**inputs).logits
    close(ours(**inputs).logits, expected)  # eval forward with grad enabled
    ours.train()
    with torch.no_grad():
        close(ours(**inputs).logits, expected)  # train-mode inference under no_grad
    with pytest.raises(AdapterStateError, match="0 trainable parameters.*is_trainable=True"):
        ours(**inputs)
    ours.print_trainable_parameters()
    peft.PeftModel.from_pretrained(models.make_llama(), folder).print_trainable_parameters()
    ours_line, notice, theirs_line = capsys.readouterr().out.splitlines()
    assert ours_line == theirs_line and "NO trainable parameters" in notice
    ours.set_requires_grad("default")
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()  # now it trains


def test_frozen_adapter_made_trainable_by_hand_is_allowed(tmp_path):
    """As in HF PEFT tutorials: load frozen, then set requires_grad on the LoRA weights yourself - this
    trains."""
    _, folder = hf_saved(tmp_path)
    ours = fastpeft.PeftModel.from_pretrained(models.make_llama(), folder).train()
    for name, param in ours.named_parameters():
        param.requires_grad_("lora_B" in name)
    inputs = models.llama_inputs()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_B" in n)


def test_print_trainable_parameters_first_line_as_hf(capsys):
    """The first line is HF PEFT's exactly; the extra notice appears only with 0 trainable parameters."""
    lora_llama(peft).print_trainable_parameters()
    lora_llama(fastpeft).print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.splitlines()
    assert ours == theirs


# ----------------------------------------------------------------------- empty (partitioned) tensors in saves
def test_empty_tensors_are_not_saved(tmp_path):
    """HF PEFT writes the 0-element placeholders of partitioned (ZeRO-3) parameters into the file, so the
    saved adapter is empty. fastpeft refuses, names the keys and the fix, and writes nothing."""
    theirs = lora_llama(peft)
    placeholders = {k: torch.empty(0) for k in theirs.state_dict() if "lora_A" in k}
    theirs.save_pretrained(tmp_path / "hf", state_dict={**theirs.state_dict(), **placeholders})
    assert all(t.numel() == 0 for k, t in load_file(tmp_path / "hf" / "adapter_model.safetensors").items()
               if "lora_A" in k)

    ours = lora_llama(fastpeft)
    for name, param in ours.named_parameters():
        if "lora_A" in name:
            param.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves on each rank outside a gather
    with pytest.raises(AdapterStateError, match=r"4 tensor\(s\) are empty.*lora_A.*state_dict="):
        ours.save_pretrained(tmp_path / "ours")
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()


def test_rank_zero_matrices_are_not_placeholders():
    """AdaLoRA prunes whole layers to rank 0: (0, n) matrices are real adapter tensors (HF PEFT saves them
    too)."""
    checks.refuse_empty_tensors({"x.lora_A": torch.zeros(0, 4), "x.lora_E": torch.zeros(0, 1)}, "default")
    with pytest.raises(AdapterStateError, match=r"\['x.lora_B'\]"):
        checks.refuse_empty_tensors({"x.lora_A": torch.zeros(0, 4), "x.lora_B": torch.empty(0)}, "default")


def test_gathered_state_dict_saves_like_hf(tmp_path):
    """The fix the error names: pass the full state dict (as Trainer does); the file then matches HF
    PEFT's."""
    theirs = lora_llama(peft)
    ours = lora_llama(fastpeft)
    full = ours.state_dict()
    for name, param in ours.named_parameters():
        if "lora_A" in name:
            param.data = torch.empty(0)
    ours.save_pretrained(tmp_path / "ours", state_dict=full)
    theirs.save_pretrained(tmp_path / "hf")
    a, b = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "ours", tmp_path / "hf"))
    assert a.keys() == b.keys()
    for key in a:
        close(a[key], b[key])


# ----------------------------------------------------------------- adapters follow the base model's eval mode
def dropout_modes(model) -> set[bool]:
    return {m.training for n, m in model.named_modules() if "lora_dropout." in n}


def test_adapters_on_an_eval_model_start_in_eval_mode(tmp_path):
    """HF PEFT: get_peft_model / add_adapter / inject_adapter_in_model on an eval() model create LoRA dropout
    in train mode, so "inference" is random until the user calls eval() again. fastpeft follows the model's
    mode; outputs then equal HF PEFT's after an explicit eval()."""
    inputs = models.llama_inputs()
    theirs = lora_llama(peft, lora_dropout=0.5)
    assert dropout_modes(theirs) == {True}  # HF PEFT's behaviour on an eval base
    ours = lora_llama(fastpeft, lora_dropout=0.5)
    assert dropout_modes(ours) == {False} and not ours.training
    close(ours(**inputs).logits, theirs.eval()(**inputs).logits)
    ours.add_adapter("other", fastpeft.LoraConfig(target_modules=["q_proj"], lora_dropout=0.5))
    assert dropout_modes(ours) == {False}
    injected = fastpeft.inject_adapter_in_model(
        fastpeft.LoraConfig(target_modules=["q_proj"], lora_dropout=0.5), models.make_llama())
    assert dropout_modes(injected) == {False}


def test_adapters_on_a_train_model_start_in_train_mode(tmp_path):
    """As HF PEFT: a model in train() mode gets train-mode adapters (dropout active), also when loading
    one."""
    theirs = lora_llama(peft, base=models.make_llama().train(), lora_dropout=0.5)
    ours = lora_llama(fastpeft, base=models.make_llama().train(), lora_dropout=0.5)
    assert dropout_modes(ours) == dropout_modes(theirs) == {True} and ours.training
    theirs.eval().save_pretrained(tmp_path / "hf")
    loaded = fastpeft.PeftModel.from_pretrained(models.make_llama().train(), tmp_path / "hf",
                                                is_trainable=True)
    assert dropout_modes(loaded) == {True}
    on_eval = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "hf", is_trainable=True)
    assert dropout_modes(on_eval) == {False}
    on_eval.load_adapter(tmp_path / "hf", adapter_name="again", is_trainable=True)
    assert dropout_modes(on_eval) == {False}


def test_prompt_encoder_follows_the_model_mode():
    """HF PEFT leaves a new prompt encoder (P-tuning's LSTM with dropout) in train mode on an eval model."""
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16, encoder_dropout=0.5,
               encoder_reparameterization_type="LSTM")
    theirs = peft.get_peft_model(models.make_llama(), peft.PromptEncoderConfig(**cfg))
    assert {m.training for m in theirs.prompt_encoder.modules()} == {True}
    ours = fastpeft.get_peft_model(models.make_llama(), fastpeft.PromptEncoderConfig(**cfg))
    assert {m.training for m in ours.prompt_encoder.modules()} == {False}
    inputs = models.llama_inputs()
    close(ours(**inputs).logits, ours(**inputs).logits)
