"""TRL's SFTTrainer(peft_config=...) trains the same adapter on fastpeft as on HF PEFT (the oracle, run by the
dev venv's Python in a subprocess so the two `peft` packages never meet): same seed, data and steps, same
tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ORACLE_PYTHON = os.environ.get("ORACLE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))

SCRIPT = """
import sys, torch
if {alias}:
    import fastpeft; fastpeft.install_as_peft()
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer
words = ["<pad>", "<eos>", "<unk>", *"the cat sat on mat a dog ran in park".split()]
tok = Tokenizer(WordLevel({{w: i for i, w in enumerate(words)}}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                    unk_token="<unk>")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
data = Dataset.from_dict({{"text": ["the cat sat on the mat", "a dog ran in the park"] * 4}})
args = SFTConfig({out!r}, max_steps=3, per_device_train_batch_size=2, learning_rate=0.5, report_to=[], seed=0,
                 # SGD in float32 without clipping: Adam, clipping and bf16 would each hide a small error
                 optim="sgd", max_grad_norm=0.0, bf16=False,
                 use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
trainer.train()
trainer.save_model({out!r} + "/final")
"""


def _trained(python: str, alias: bool, out: Path) -> dict[str, torch.Tensor]:
    code = SCRIPT.format(alias=alias, out=str(out))
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_sft_adapter_equals_hf_peft(tmp_path):
    if not Path(ORACLE_PYTHON).exists():
        pytest.fail(f"the oracle's Python {ORACLE_PYTHON} is missing: run `make install` (the "
                    "dev venv has HF PEFT)")
    expected = _trained(ORACLE_PYTHON, False, tmp_path / "hf")
    got = _trained(sys.executable, True, tmp_path / "fastpeft")
    assert sorted(got) == sorted(expected)
    # it trained (lora_B starts at 0)
    assert all(expected[k].abs().max() > 0 for k in expected if "lora_B" in k)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=key)
