"""transformers' Trainer and TRL's trainers on fastpeft serving as `peft` (install_as_peft, HF PEFT not
installed).

Covers what they call on a PeftModel (the model card on push_to_hub, adapter files, multi-adapter resume, the
reference model by disabled adapters) and that they recognise fastpeft models with no patching of theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.integrations import transformers as integration

import models

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}
TESTS_DIR = str(Path(__file__).resolve().parents[1] / "tests")


def lora(task_type="CAUSAL_LM", **kwargs):
    return fastpeft.LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               **kwargs)


def lora_llama(base=None, **kwargs):
    return fastpeft.get_peft_model(models.make_llama() if base is None else base, lora(**kwargs))


def tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on mat a dog ran in park".split()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])},
                              unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def rows(n: int = 8, seq: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        ids = (torch.arange(seq) + 3 * (i % 4)) % 100
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                    "labels": ids.clone()})
    return out


def train_args(cls, out, **kwargs):
    base = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=5e-2, logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return cls(str(out), **{**base, **kwargs})


def adapter_state(model, name="default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone()
            for k, v in fastpeft.get_peft_model_state_dict(model, adapter_name=name).items()}


def assert_adapter_only(folder) -> None:
    files = set(os.listdir(folder))
    assert ADAPTER_FILES <= files and not files & FULL_MODEL_FILES, files


# ---------------------------------------------------------------------------------------------- recognition


def test_trainers_recognise_fastpeft_models_without_patching():
    import accelerate.utils
    import transformers.trainer as hf_trainer
    import transformers.trainer_utils as hf_trainer_utils
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.sft_trainer as sft

    model = lora_llama()  # PeftModel.__init__ calls enable_trainer_support()
    assert integration.fastpeft_serves_as_peft()
    for name, attrs in integration.TARGETS.items():
        module = sys.modules.get(name)
        for attr in attrs if module is not None else ():
            assert not getattr(getattr(module, attr, None), integration.MARK, False), (
                f"{name}.{attr} was patched")
    assert not any(isinstance(f, integration._PostImportFinder) for f in sys.meta_path)
    assert hf_trainer.PeftModel is fastpeft.PeftModel and hf_trainer_utils._is_peft_model(model)
    assert accelerate.utils.is_peft_model(model) and sft.is_peft_model(model) and dpo.is_peft_model(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, sft.BaseTunerLayer) and isinstance(layer, dpo.BaseTunerLayer)
    assert not hf_trainer_utils._is_peft_model(models.make_llama())


def test_trainer_modules_imported_after_alias_are_left_alone():
    """A PeftModel made before install_as_peft() installs the post-import patcher; once fastpeft is `peft`,
    the trainer modules imported later are not patched (and still recognise the model)."""
    code = ("import fastpeft, models\n"
            "from fastpeft.integrations import transformers as integration\n"
            "m = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=['lin0']))\n"
            "fastpeft.install_as_peft()\n"
            "import transformers.trainer as t\n"
            "assert not hasattr(t._is_peft_model, integration.MARK), 'patched'\n"
            "assert t._is_peft_model(m) and t.PeftModel is fastpeft.PeftModel\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- PeftModel API


def test_peft_model_api_the_trainers_read(tmp_path):
    """What Trainer / TRL read or call besides training: adapter names, prefix, counts, merge, selective
    saves."""
    model = models.perturb(lora_llama(), seed=4, scale=0.2)
    model.add_adapter("other", lora())
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    assert model.active_peft_config is model.peft_config["default"] and model.prefix == "lora_"
    params = list(model.parameters())
    assert model.get_nb_trainable_parameters() == (sum(p.numel() for p in params if p.requires_grad),
                                                   sum(p.numel() for p in params))
    inputs = models.llama_inputs()
    expected = models.forward(model, inputs)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = q_proj.detach().clone()
    model.merge_adapter()  # TRL's vLLM weight sync
    assert not torch.equal(q_proj, before)
    torch.testing.assert_close(models.forward(model, inputs), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(q_proj, before, atol=1e-6, rtol=0)

    # TRL's async trainers: one non-default adapter, from a given state dict, into <dir>/<name>/
    model.save_pretrained(str(tmp_path / "sel"), selected_adapters=["other"], state_dict=model.state_dict())
    assert (os.listdir(tmp_path / "sel") == ["other"]
            and ADAPTER_FILES <= set(os.listdir(tmp_path / "sel" / "other")))
    stored = load_file(str(tmp_path / "sel" / "other" / "adapter_model.safetensors"))
    assert stored.keys() == adapter_state(model, "other").keys()
    model.save_pretrained(str(tmp_path / "rank1"), is_main_process=False)
    assert not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------------------------------------- Trainer


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub's create_repo / upload_folder replaced: records the calls and what the folder held."""
    from huggingface_hub import HfApi

    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append(repo_id)
        return types.SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {f: Path(folder_path, f).read_bytes() for f in os.listdir(folder_path)
                 if Path(folder_path, f).is_file()}
        calls["upload_folder"].append({"repo_id": repo_id, "files": files, **kwargs})
        return types.SimpleNamespace(oid="0" * 40)

    def offline(self, *args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "model_info", offline)
    return calls


def test_trainer_push_to_hub_uploads_adapter_and_peft_card(fake_hub, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import Trainer, TrainingArguments

    model = lora_llama()
    trainer = Trainer(model=model, args=train_args(TrainingArguments, tmp_path / "run"), train_dataset=rows())
    trainer.train()
    trainer.push_to_hub(commit_message="done")
    assert fake_hub["create_repo"] == ["run"]
    (upload,) = fake_hub["upload_folder"]
    assert upload["repo_id"] == "me/run" and upload["commit_message"] == "done"
    files = upload["files"]
    assert ADAPTER_FILES <= set(files) and not set(files) & FULL_MODEL_FILES, sorted(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lora", "fastpeft", "generated_from_trainer"} <= set(card.data.tags)
    assert "Saved with fastpeft" in card.text and f"- fastpeft {fastpeft.__version__}" in card.text
    assert "## Training procedure" in card.text  # the Trainer's own section is kept


def test_create_or_update_model_card_new_existing_and_idempotent(tmp_path):
    from huggingface_hub import ModelCard

    base = models.make_llama()
    base.name_or_path = "org/base"
    model = lora_llama(base)
    model.create_or_update_model_card(tmp_path / "new")
    first = (tmp_path / "new" / "README.md").read_text()
    card = ModelCard(first)
    assert card.data.library_name == "peft" and card.data.base_model == "org/base"
    assert {"lora", "fastpeft", "base_model:adapter:org/base"} <= set(card.data.tags)
    model.create_or_update_model_card(tmp_path / "new")
    assert (tmp_path / "new" / "README.md").read_text() == first

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- mine\n---\n\n# My model\n\nKeep this line.\n")
    model.create_or_update_model_card(tmp_path / "mine")
    card = ModelCard.load(tmp_path / "mine" / "README.md")
    assert card.data.library_name == "peft" and {"mine", "lora"} <= set(card.data.tags)
    assert "Keep this line." in card.text and card.text.count("Saved with fastpeft") == 1


def test_resume_with_two_adapters_loads_each_from_its_subfolder(tmp_path):
    from transformers import Trainer, TrainingArguments

    def two_adapter_model():
        model = lora_llama()
        model.add_adapter("other", lora())
        model.set_adapter("other")  # Trainer trains the active adapter; "default" stays at its init
        return model

    model = two_adapter_model()
    args = dict(max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=model, args=train_args(TrainingArguments, tmp_path / "run", **args),
            train_dataset=rows()).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert_adapter_only(checkpoint)
    assert ADAPTER_FILES <= set(os.listdir(checkpoint / "other"))  # non-default adapters in a subfolder
    fresh = two_adapter_model()
    trained = adapter_state(model, "other")
    assert not all(torch.equal(v, trained[k]) for k, v in adapter_state(fresh, "other").items())
    trainer = Trainer(model=fresh, args=train_args(TrainingArguments, tmp_path / "run2", **args),
                      train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert fresh.active_adapters == ["other"]
    for name in ("default", "other"):
        for key, value in adapter_state(model, name).items():
            assert torch.equal(adapter_state(fresh, name)[key], value), (name, key)


# ---------------------------------------------------------------------------------------------- TRL


def test_sft_trainer_with_peft_config_saves_adapter_files_only(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog ran in the park"] * 4})
    trainer = SFTTrainer(model=models.make_llama(), args=train_args(SFTConfig, tmp_path / "run"),
                         train_dataset=data, processing_class=tokenizer(), peft_config=lora())
    model = trainer.model
    assert isinstance(model, fastpeft.PeftModelForCausalLM)
    trainer.train()
    assert trainer.state.global_step == 2
    trained = adapter_state(model)
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # it learned something
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final")
    stored = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert stored.keys() == trained.keys() and all(torch.equal(stored[k], trained[k]) for k in stored)


def dpo_data():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["the cat", "a dog"] * 2,
                              "chosen": [" sat on the mat", " ran in the park"] * 2,
                              "rejected": [" ran", " sat"] * 2})


def dpo_metrics(trainer, batch, disabled: bool = False) -> dict[str, float]:
    model = trainer.model
    trainer._metrics["eval"].clear()
    with torch.no_grad(), (model.disable_adapter() if disabled else torch.enable_grad()):
        trainer.compute_loss(model, batch)
    return {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def ref_logps(metrics: dict[str, float], beta: float) -> float:
    return metrics["logps/chosen"] - metrics["rewards/chosen"] / beta  # rewards = beta * (policy - reference)


def test_dpo_with_peft_config_uses_the_disabled_adapter_as_reference(tmp_path, monkeypatch):
    from transformers.modeling_utils import PreTrainedModel
    from trl import DPOConfig, DPOTrainer

    base = models.make_llama()
    built = []
    original_init = PreTrainedModel.__init__
    monkeypatch.setattr(PreTrainedModel, "__init__",
                        lambda self, *a, **k: built.append(1) or original_init(self, *a, **k))
    trainer = DPOTrainer(model=base, ref_model=None, args=train_args(DPOConfig, tmp_path / "run"),
                         train_dataset=dpo_data(), processing_class=tokenizer(), peft_config=lora())
    assert trainer.ref_model is None and not built  # no second model
    assert isinstance(trainer.model, fastpeft.PeftModel) and "ref" not in trainer.model.peft_config
    trainer.train()
    trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trained, without = dpo_metrics(trainer, batch), dpo_metrics(trainer, batch, disabled=True)
    assert abs(trained["logps/chosen"] - without["logps/chosen"]) > 1e-3  # the adapter changed the policy
    # ref = base model
    assert ref_logps(trained, trainer.beta) == pytest.approx(without["logps/chosen"], abs=1e-4)


def test_dpo_on_a_peft_model_copies_its_adapter_as_reference(tmp_path):
    from trl import DPOConfig, DPOTrainer

    model = models.perturb(lora_llama(), seed=3, scale=0.2)
    trainer = DPOTrainer(model=model, args=train_args(DPOConfig, tmp_path / "run"), train_dataset=dpo_data(),
                         processing_class=tokenizer())
    assert trainer.ref_model is None and set(model.peft_config) == {"default", "ref"}
    default, ref = adapter_state(model, "default"), adapter_state(model, "ref")
    assert default.keys() == ref.keys() and all(torch.equal(default[k], ref[k]) for k in default)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.eval()
    metrics, without = dpo_metrics(trainer, batch), dpo_metrics(trainer, batch, disabled=True)
    assert metrics["rewards/chosen"] == 0.0  # reference = the copied adapter, not the base model
    assert abs(metrics["logps/chosen"] - without["logps/chosen"]) > 1e-3


def test_grpo_kto_and_reward_trainers_take_peft_config(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer

    def length_reward(completions, **_):
        return [float(len(c)) for c in completions]

    grpo = GRPOTrainer(model=models.make_llama(), reward_funcs=length_reward,
                       args=train_args(GRPOConfig, tmp_path / "grpo", max_steps=1, num_generations=2,
                                       max_completion_length=4),
                       train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog"] * 2}),
                       processing_class=tokenizer(), peft_config=lora())
    kto_data = Dataset.from_dict({"prompt": ["the cat", "a dog"] * 2,
                                  "completion": [" sat on the mat", " ran"] * 2, "label": [True, False] * 2})
    kto = KTOTrainer(model=models.make_llama(), args=train_args(KTOConfig, tmp_path / "kto", max_steps=1),
                     train_dataset=kto_data, processing_class=tokenizer(), peft_config=lora())
    scorer = LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, num_labels=1, pad_token_id=0))
    pairs = Dataset.from_dict({"chosen": ["the cat sat on the mat", "a dog ran in the park"] * 2,
                               "rejected": ["the cat", "a dog"] * 2})
    reward = RewardTrainer(model=scorer, args=train_args(RewardConfig, tmp_path / "reward", max_steps=1),
                           train_dataset=pairs, processing_class=tokenizer(), peft_config=lora("SEQ_CLS"))
    assert isinstance(grpo.model, fastpeft.PeftModelForCausalLM)
    assert isinstance(kto.model, fastpeft.PeftModelForCausalLM)
    assert isinstance(reward.model, fastpeft.PeftModelForSequenceClassification)
    assert kto.ref_model is None
    for name, trainer in (("grpo", grpo), ("kto", kto), ("reward", reward)):
        trainer.train()
        assert trainer.state.global_step == 1, name
        trainer.save_model(str(tmp_path / name / "final"))
        assert_adapter_only(tmp_path / name / "final")
    stored = load_file(str(tmp_path / "reward" / "final" / "adapter_model.safetensors"))
    assert any(".score." in k for k in stored)  # the new head is trained and saved whole
