"""HF PEFT's seed example, verbatim but for the import, on tiny models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset

from fastpeft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, TaskType, get_peft_model

VOCAB = 100


class Seq2SeqData(Dataset):
    """Synthetic translation pairs: the target is the source shifted by one token id."""

    def __init__(self, n: int = 8, seq: int = 7):
        g = torch.Generator().manual_seed(42)
        self.src = torch.randint(3, VOCAB - 1, (n, seq), generator=g)

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        ids = self.src[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids + 1}


def tiny_mt5():
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = MT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1)
    return MT5ForConditionalGeneration(cfg)


def test_seed_example_seq2seq_lora_trains_with_trainer_and_saves(tmp_path, capsys):
    from transformers import Trainer, TrainingArguments

    model = tiny_mt5()
    peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                             lora_dropout=0.1)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert "trainable params" in printed

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # the T5 defaults: q and v of every attention block (self + cross), both stacks
    assert any(".q.lora_A." in n for n in trainable) and any(".v.lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Seq2SeqData())
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))

    changed_adapter = [n for n in trainable if not torch.equal(before[n], model.get_parameter(n).detach())]
    assert changed_adapter, "no adapter weight changed during training"
    # lora_B starts at zero and gets a gradient at once: every one of them must have moved
    assert all(n in changed_adapter for n in trainable if ".lora_B." in n)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(before[n], p.detach()), f"base weight {n} changed"

    out = tmp_path / "adapter"
    model.save_pretrained(out)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()

    # the trained adapter reloads onto a fresh base and reproduces the trained model
    reloaded = PeftModel.from_pretrained(tiny_mt5(), out)
    batch = Seq2SeqData()[0]
    inputs = {k: v[None] for k, v in batch.items()}
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


LLAMA_KW = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


@pytest.fixture
def llama_base_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA_KW))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    return base_dir


def test_causal_lm_auto_peft_model_generates_like_the_in_memory_model(tmp_path, llama_base_dir):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(llama_base_dir)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert model.peft_config["default"].base_model_name_or_path == str(llama_base_dir)

    input_ids = torch.tensor([[1, 5, 9, 13, 17], [1, 22, 3, 40, 8]])
    model.eval()
    with torch.no_grad():
        expected = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids).logits
        peft_logits = model(input_ids=input_ids).logits
    assert expected.shape == (2, 10)
    assert not torch.allclose(base_logits, peft_logits, atol=1e-3), "the adapter does not change the model"

    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(loaded, PeftModel)
    assert all(not p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        got = loaded.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
        assert torch.allclose(loaded(input_ids=input_ids).logits, peft_logits, atol=1e-5)
    assert torch.equal(got, expected)

    import peft

    hf = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    hf.eval()
    with torch.no_grad():
        hf_out = hf.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
        assert torch.allclose(hf(input_ids=input_ids).logits, peft_logits, atol=1e-5)
    assert torch.equal(hf_out, expected)
    assert os.path.samefile(hf.peft_config["default"].base_model_name_or_path, llama_base_dir)
