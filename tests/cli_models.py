"""Tiny offline models and datasets for the CLI tests (tests/cli/ and tests/safety/): a Llama (causal LM) and
a BERT classifier.

Both are built from configs with a WordLevel tokenizer ("wK" -> id K) and saved to temp folders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

VOCAB = 60
SPECIAL = {"[UNK]": 0, "[PAD]": 1, "</s>": 2}


def save_tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer over w3..w59 plus [UNK]/[PAD]/</s>."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIAL, **{f"w{i}": i for i in range(len(SPECIAL), VOCAB)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="</s>", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(folder)


def save_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=1, eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_bert(folder: Path, num_labels: int = 2) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, pad_token_id=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def lm_texts(n: int = 12) -> list[str]:
    """Counting sequences: "w5 w6 w7 ..." of varying lengths (learnable by a tiny model)."""
    return [" ".join(f"w{3 + (start + k) % 50}" for k in range(4 + start % 5)) for start in range(n)]


def cls_rows(n: int = 16) -> list[dict]:
    """Label "pos" when the text uses low word ids, "neg" for high ones."""
    rows = []
    for i in range(n):
        low = i % 2 == 0
        words = [f"w{(3 if low else 30) + (i + k) % 20}" for k in range(5)]
        rows.append({"text": " ".join(words), "label": "pos" if low else "neg"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
