"""fastpeft models under transformers' Trainer, TRL's SFTTrainer and Accelerate, with and without HF PEFT
installed.

"Without" is simulated: `import peft` fails and every `is_peft_available` the trainers read answers False.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastpeft
from fastpeft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model, get_peft_model_state_dict
from fastpeft.integrations import transformers as integration

import models

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
ALLOWED_EXTRA = {"README.md", "training_args.bin"}  # the Trainer always stores its arguments
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}


def _missing_peft(monkeypatch) -> None:
    import accelerate.utils.modeling as acc_modeling
    import transformers.trainer as hf_trainer
    import transformers.trainer_utils as hf_trainer_utils
    import trl.trainer.sft_trainer as sft

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    for module in (hf_trainer_utils, hf_trainer, acc_modeling, sft):
        monkeypatch.setattr(module, "is_peft_available", lambda: False)
    for module, names in ((hf_trainer, ("PeftModel",)), (hf_trainer_utils, ("PeftModel", "PeftMixedModel")),
                          (sft, ("PeftModel", "PeftConfig", "BaseTunerLayer", "get_peft_model"))):
        for name in names:
            monkeypatch.delattr(module, name, raising=False)
    integration.enable_trainer_support()
    with pytest.raises(ImportError):
        import peft  # noqa: F401


@pytest.fixture(params=["hf_peft_installed", "hf_peft_missing"])
def peft_env(request, monkeypatch):
    if request.param == "hf_peft_missing":
        _missing_peft(monkeypatch)
    return request.param


def _lora_llama(base=None):
    base = models.make_llama() if base is None else base
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                           target_modules=["q_proj", "v_proj"]))


def _dataset(n: int = 16, seq: int = 8) -> list[dict]:
    """A learnable pattern: each row counts up from a different start."""
    rows = []
    for i in range(n):
        ids = (torch.arange(seq) + 3 * (i % 4)) % 100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "labels": ids.clone()})
    return rows


def _args(out, **kwargs):
    from transformers import TrainingArguments

    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=6, learning_rate=2e-2,
                logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(str(out), **{**base, **kwargs})


def _trainer(model, out, **kwargs):
    from transformers import Trainer

    data = _dataset()
    return Trainer(model=model, args=_args(out, **kwargs), train_dataset=data, eval_dataset=data[:8])


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _assert_adapter_only(folder) -> None:
    files = set(os.listdir(folder))
    assert ADAPTER_FILES <= files, files
    assert not files & FULL_MODEL_FILES, files


def _assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------- the patch itself


def test_patch_recognises_fastpeft_and_keeps_hf_peft():
    import peft
    from transformers import trainer_utils

    ours = _lora_llama()
    theirs = peft.get_peft_model(models.make_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    assert trainer_utils._is_peft_model(ours) and trainer_utils._is_peft_model(theirs)
    assert not trainer_utils._is_peft_model(models.make_llama())
    assert trainer_utils.unwrap_peft_model(ours) is ours.get_base_model()


def test_patch_is_idempotent_and_repairs_reset_names(monkeypatch):
    import transformers.trainer as hf_trainer

    integration.enable_trainer_support()
    before = {name: getattr(hf_trainer, name) for name in integration.TARGETS["transformers.trainer"]}
    integration.enable_trainer_support()
    assert {name: getattr(hf_trainer, name) for name in before} == before
    original = before["_is_peft_model"].__wrapped__
    assert not hasattr(original, integration.MARK)  # one layer of wrapping, not a chain
    monkeypatch.setattr(hf_trainer, "_is_peft_model", original)
    integration.enable_trainer_support()
    assert getattr(hf_trainer._is_peft_model, integration.MARK) and hf_trainer._is_peft_model(_lora_llama())


def test_import_is_lazy_and_later_imports_get_patched():
    """`import fastpeft` imports no trainer; a trainer module imported after the first PeftModel is
    patched."""
    code = (
        "import sys, fastpeft, models\n"
        "assert 'transformers.trainer' not in sys.modules and 'trl' not in sys.modules\n"
        "m = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=['lin0']))\n"
        "import transformers.trainer as t, trl.trainer.sft_trainer as s\n"
        "assert t._is_peft_model(m) and isinstance(m, t.PeftModel) and s.is_peft_model(m)\n"
        "assert not t._is_peft_model(models.make_mlp())\n"
    )
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: models.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- Trainer


def test_trainer_trains_saves_resumes_and_evaluates(peft_env, tmp_path):
    model = _lora_llama()
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    trained = _adapter_state(model)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))

    trainer.save_model(str(tmp_path / "final"))
    _assert_adapter_only(tmp_path / "final")
    assert set(os.listdir(tmp_path / "final")) <= ADAPTER_FILES | ALLOWED_EXTRA | {"trainer_state.json"}
    for step in (3, 6):
        _assert_adapter_only(tmp_path / "run" / f"checkpoint-{step}")

    # resume from the middle: adapter, optimizer and data order come back, so the run ends where the first did
    fresh = _lora_llama()
    resumed = _trainer(fresh, tmp_path / "run2")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    _assert_states_close(_adapter_state(fresh), trained, atol=1e-5)


def test_resume_restores_adapter_weights(tmp_path):
    model = _lora_llama()
    _trainer(model, tmp_path / "run").train()
    _assert_adapter_only(tmp_path / "run" / "checkpoint-6")
    fresh = _lora_llama()
    assert not torch.equal(next(iter(_adapter_state(fresh).values())),
                           next(iter(_adapter_state(model).values())))
    # nothing left to train at step 6: what the model holds afterwards is exactly what the checkpoint held
    _trainer(fresh, tmp_path / "run2").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    _assert_states_close(_adapter_state(fresh), _adapter_state(model), atol=0)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


def test_auto_peft_model_reproduces_trained_model(tmp_path):
    from transformers import LlamaForCausalLM

    models.make_llama().save_pretrained(tmp_path / "base")
    model = _lora_llama(LlamaForCausalLM.from_pretrained(str(tmp_path / "base")))
    trainer = _trainer(model, tmp_path / "run", max_steps=4, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    model.eval()
    inputs = models.llama_inputs()
    torch.testing.assert_close(models.forward(loaded, inputs), models.forward(model, inputs))
    assert not torch.allclose(models.forward(loaded, inputs), models.forward(models.make_llama(), inputs))


# ---------------------------------------------------------------------------------------------- checkpointing


def _enable_before(base):
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return _lora_llama(base), {}


def _enable_after(base):
    model = _lora_llama(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model, {}


def _enable_by_args(base):
    return _lora_llama(base), {"gradient_checkpointing": True,
                               "gradient_checkpointing_kwargs": {"use_reentrant": True}}


@pytest.mark.parametrize("how", [_enable_before, _enable_after, _enable_by_args],
                         ids=["before", "after", "args"])
def test_gradient_checkpointing_trains_adapters(how, peft_env, tmp_path):
    model, extra = how(models.make_llama())
    trainer = _trainer(model, tmp_path / "run", max_steps=2, save_strategy="no", **extra)
    trainer.train()  # reentrant checkpointing with frozen inputs would raise "does not require grad"
    assert model.get_base_model().is_gradient_checkpointing
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values()), (
        "LoRA B stayed at its zero init: no gradient")


# ---------------------------------------------------------------------------------------------- TRL


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on mat a dog ran in park".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def test_sft_trainer_trains_a_wrapped_model(peft_env, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _lora_llama()
    data = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog ran in the park"] * 8})
    args = SFTConfig(str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6, learning_rate=2e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tiny_tokenizer())
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    trainer.save_model(str(tmp_path / "final"))
    _assert_adapter_only(tmp_path / "final")
    reloaded = _lora_llama()
    reloaded.load_adapter(str(tmp_path / "final"), "default")
    _assert_states_close(_adapter_state(reloaded), _adapter_state(model), atol=0)


def _dpo_run(lib, tmp_path) -> tuple[object, list[float]]:
    """Two DPO steps on a wrapped LoRA model with no ref_model (no install_as_peft)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = lib.get_peft_model(models.make_llama(), lib.LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                   target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.normal_(std=0.05)
    data = Dataset.from_dict({"prompt": ["the cat", "a dog"] * 4,
                              "chosen": [" sat on the mat", " ran in the park"] * 4,
                              "rejected": [" ran in the park", " sat on the mat"] * 4})
    args = DPOConfig(str(tmp_path / lib.__name__), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                     seed=0, logging_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=_tiny_tokenizer())
    trainer.train()
    return trainer, _losses(trainer)


def test_dpo_trainer_uses_the_adapter_disabled_model_as_reference(tmp_path):
    """TRL's DPOTrainer asks accelerate's is_peft_model (imported by name): unrecognised, a fastpeft model
    got a second full model as its reference, and the step failed. Recognised, it runs as with HF PEFT."""
    import peft

    ours, our_losses = _dpo_run(fastpeft, tmp_path)
    theirs, their_losses = _dpo_run(peft, tmp_path)
    assert ours.ref_model is None and theirs.ref_model is None
    assert our_losses == pytest.approx(their_losses, abs=1e-5)
    assert our_losses[1] != our_losses[0]


@pytest.mark.parametrize("module", [m for m in integration.TARGETS if m.startswith("trl.")])
def test_trl_trainer_modules_recognise_fastpeft_models(module):
    import importlib

    trl_module = importlib.import_module(module)
    integration.enable_trainer_support()
    model = _lora_llama()
    assert trl_module.is_peft_model(model) and not trl_module.is_peft_model(models.make_llama())
    if "BaseTunerLayer" in integration.TARGETS[module]:
        assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, trl_module.BaseTunerLayer)


# ---------------------------------------------------------------------------------------------- Accelerate


def test_accelerate_custom_loop(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _lora_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {k: torch.stack([row[k] for row in _dataset(4)])
             for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(str(tmp_path / "adapter"), is_main_process=accelerator.is_main_process)
    _assert_adapter_only(tmp_path / "adapter")
    reloaded = _lora_llama()
    reloaded.load_adapter(str(tmp_path / "adapter"), "default")
    _assert_states_close(_adapter_state(reloaded), _adapter_state(unwrapped), atol=0)


# ---------------------------------------------------------------------------------------------- PeftModel API


def _prompt_pair(config_name: str):
    import peft

    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    theirs = peft.get_peft_model(models.make_llama(), getattr(peft, config_name)(**kwargs))
    ours = fastpeft.get_peft_model(models.make_llama(), getattr(fastpeft, config_name)(**kwargs))
    ours.prompt_encoder.load_state_dict(models.perturb(theirs, seed=2).prompt_encoder.state_dict())
    return theirs, ours


@pytest.mark.parametrize("config_name", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_get_prompt_and_prompt_embedding_to_save_as_hf_peft(config_name):
    theirs, ours = _prompt_pair(config_name)
    expected, got = theirs.get_prompt(2), ours.get_prompt(2)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    else:  # prefix tuning: the pre-filled key/value cache
        assert type(got) is type(expected) and len(got.layers) == len(expected.layers) == 2
        for mine, hf in zip(got.layers, expected.layers):
            assert torch.equal(mine.keys, hf.keys) and torch.equal(mine.values, hf.values)
    assert torch.equal(ours.get_prompt_embedding_to_save("default"),
                       theirs.get_prompt_embedding_to_save("default"))
    with pytest.raises(NotImplementedError, match="max_cache_len"):
        ours.get_prompt(2, max_cache_len=16)


def test_get_prompt_refused_for_layer_methods():
    with pytest.raises(ValueError, match="get_prompt applies to prompt methods"):
        _lora_llama().get_prompt(2)
    with pytest.raises(ValueError, match="get_prompt_embedding_to_save applies to prompt methods"):
        _lora_llama().get_prompt_embedding_to_save("default")


def test_has_active_enabled_adapter_as_hf_peft():
    import peft

    theirs = peft.get_peft_model(models.make_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    ours = _lora_llama()
    for model in (theirs, ours):
        assert model.has_active_enabled_adapter
        with model.disable_adapter():
            assert not model.has_active_enabled_adapter
        assert model.has_active_enabled_adapter


def test_add_and_load_adapter_autocast_dtype_as_hf_peft(tmp_path):
    import peft

    def dtypes(lib, tmp):
        model = lib.get_peft_model(models.make_llama().bfloat16(),
                                   lib.LoraConfig(r=4, target_modules=["q_proj"]))
        model.add_adapter("kept", lib.LoraConfig(r=4, target_modules=["q_proj"]),
                          autocast_adapter_dtype=False)
        model.add_adapter("cast", lib.LoraConfig(r=4, target_modules=["q_proj"]))
        model.save_pretrained(str(tmp))
        model.load_adapter(str(tmp), "loaded", autocast_adapter_dtype=False)
        return {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}

    ours, theirs = dtypes(fastpeft, tmp_path / "ours"), dtypes(peft, tmp_path / "theirs")
    assert ours == theirs
    assert {d for n, d in ours.items() if ".kept." in n or ".loaded." in n} == {torch.bfloat16}
    assert {d for n, d in ours.items() if ".cast." in n} == {torch.float32}


def test_prepare_model_for_gradient_checkpointing_makes_inputs_require_grad():
    from torch import nn

    model = _lora_llama()
    ids = models.llama_inputs()["input_ids"]
    base = model.get_base_model()
    assert not base.get_input_embeddings()(ids).requires_grad
    assert model.prepare_model_for_gradient_checkpointing(base) is None
    assert base.get_input_embeddings()(ids).requires_grad

    class Plain(nn.Module):  # no enable_input_require_grads: a hook on the embeddings instead
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4).requires_grad_(False)

        def get_input_embeddings(self):
            return self.emb

    plain = Plain()
    model.prepare_model_for_gradient_checkpointing(plain)
    assert plain.emb(torch.tensor([1, 2])).requires_grad
    with pytest.raises(TypeError, match="cannot make its inputs require grad"):
        model.prepare_model_for_gradient_checkpointing(nn.Linear(2, 2))
