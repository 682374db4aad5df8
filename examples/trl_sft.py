"""TRL's SFTTrainer with `peft_config=` on fastpeft: `python examples/trl_sft.py` (a tiny Llama and a
word-level tokenizer built offline; with real ones, pass a model path and your dataset)."""

import os
import tempfile

import fastpeft

fastpeft.install_as_peft()  # before TRL is imported: it imports peft when it loads

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>", *"the cat sat on mat a dog ran in park".split()]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def main() -> None:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    data = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog ran in the park"] * 4})
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(out, max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                             peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        print("trainer's model:", type(trainer.model).__name__)
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        print("saved:", sorted(os.listdir(os.path.join(out, "final"))))


if __name__ == "__main__":
    main()
