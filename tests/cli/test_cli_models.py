"""The CLI tests' tiny models and datasets (tests/cli_models.py) are what those tests assume."""

from __future__ import annotations

from cli_models import cls_rows, lm_texts, save_tokenizer


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("w5 w7")["input_ids"] == [5, 7]
    assert tok.pad_token_id == 1 and tok.eos_token_id == 2


def test_datasets_have_documented_columns():
    assert all(set(row) == {"text", "label"} for row in cls_rows())
    assert {row["label"] for row in cls_rows()} == {"pos", "neg"}
    assert len(set(lm_texts())) == len(lm_texts())
