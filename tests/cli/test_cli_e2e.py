"""End-to-end CLI runs on tiny offline models: train -> inspect --json -> merge -> compare with the adapter.

Also: ``--resume`` gives the same adapter as an uninterrupted run, and prompt tuning trains (but cannot
merge).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_models import cls_rows, lm_texts, save_bert, save_llama, write_csv, write_jsonl
from fastpeft.cli import main

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "llama": save_llama(root / "llama"),
        "bert": save_bert(root / "bert"),
        "lm": write_jsonl(root / "lm.jsonl", [{"text": t} for t in lm_texts()]),
        "cls": write_csv(root / "cls.csv", cls_rows()),
    }


def _train(*args) -> None:
    assert main(["train", *map(str, args), "--batch-size", "4", "--lr", "1e-2"]) == 0


def _inspect_json(folder, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(folder), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _logits(model, texts, tokenizer_dir):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(tokenizer_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


def _assert_merged_matches(auto_cls, base, adapter, merged, texts):
    from fastpeft import PeftModel

    unmerged = PeftModel.from_pretrained(auto_cls.from_pretrained(base), str(adapter))
    expected = _logits(unmerged, texts, merged)
    plain = _logits(auto_cls.from_pretrained(merged), texts, merged)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    disabled = _logits(auto_cls.from_pretrained(base), texts, merged)
    assert (plain - disabled).abs().max() > 1e-4, (
        "the adapter changed nothing; the comparison would be vacuous")


def test_lora_causal_lm_train_inspect_merge(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "lora.yaml"
    cfg.write_text("r: 4\nlora_alpha: 8\ntarget_modules: [k_proj]\n")
    out = tmp_path / "adapter"
    _train(setup["llama"], setup["lm"], "--config", cfg, "--target-modules", "q_proj", "v_proj",
           "--epochs", "2", "--output-dir", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8, "CAUSAL_LM")
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # flags override the file
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["steps"]) == 6 and [e["epoch"] for e in metrics["epoch_loss"]] == [1, 2]
    assert 0 < metrics["trainable_params"] < metrics["total_params"] and metrics["timing"]["seconds"] > 0
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")

    info = _inspect_json(out, capsys)
    assert info["method"] == "LORA" and info["task"] == "CAUSAL_LM" and info["ranks"] == [4]
    assert info["base_model"] == str(setup["llama"])
    assert sorted(row["module"] for row in info["layers"]) == [
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert all(row["delta_norm"] > 0 and row["scaling"] == 2.0 for row in info["layers"])
    weights = load_file(out / "adapter_model.safetensors")
    assert info["num_parameters"] == sum(t.numel() for t in weights.values()) == metrics["trainable_params"]
    assert info["file_size_bytes"] == (out / "adapter_model.safetensors").stat().st_size

    merged = tmp_path / "merged"
    assert main(["merge", str(setup["llama"]), str(out), str(merged), "--safe-merge"]) == 0
    assert not any((merged / name).exists() for name in ADAPTER_FILES)
    assert (merged / "tokenizer.json").is_file()
    _assert_merged_matches(AutoModelForCausalLM, setup["llama"], out, merged, ["w3 w4 w5 w6", "w9 w10"])


def test_lora_seq_cls_csv_with_string_labels(setup, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out, merged = tmp_path / "adapter", tmp_path / "merged"
    _train(setup["bert"], setup["cls"], "--task", "seq-cls", "--target-modules", "query", "value",
           "--epochs", "2", "--eval-data", setup["cls"], "--output-dir", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["eval"]["accuracy"] <= 1 and metrics["eval"]["examples"] == 16
    info = _inspect_json(out, capsys)
    assert "classifier" in info["modules_to_save"]
    assert {row["name"].split(".")[-1] for row in info["tensors"]} == {"weight", "bias"}  # the head copy
    assert main(["merge", str(setup["bert"]), str(out), str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    _assert_merged_matches(AutoModelForSequenceClassification, setup["bert"], out, merged,
                           ["w3 w4 w5", "w30 w31 w32 w33"])


def test_merge_refuses_non_empty_out_then_overwrites(setup, tmp_path, capsys):
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    _train(setup["llama"], setup["lm"], "--epochs", "1", "--target-modules", "q_proj", "--output-dir", out)
    merged.mkdir()
    (merged / "adapter_config.json").write_text("{}")
    assert main(["merge", str(setup["llama"]), str(out), str(merged)]) == 2
    err = capsys.readouterr().err
    assert str(merged) in err and "--overwrite" in err
    assert main(["merge", str(setup["llama"]), str(out), str(merged), "--overwrite"]) == 0
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()


def test_resume_matches_uninterrupted_run(setup, tmp_path, capsys):
    common = [setup["llama"], setup["lm"], "--r", "2", "--lora-dropout", "0.2", "--target-modules", "q_proj",
              "o_proj", "--seed", "3"]
    full, split = tmp_path / "full", tmp_path / "split"
    _train(*common, "--epochs", "3", "--output-dir", full)
    _train(*common, "--epochs", "1", "--output-dir", split)
    assert main(["train", *map(str, common), "--batch-size", "4", "--lr", "1e-2", "--epochs", "3",
                 "--output-dir", str(split)]) == 2
    assert "--resume" in capsys.readouterr().err
    _train(*common, "--epochs", "3", "--output-dir", split, "--resume")
    assert "resuming from" in capsys.readouterr().out
    a, b = (load_file(d / "adapter_model.safetensors") for d in (full, split))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [[s["loss"] for s in json.loads((d / "metrics.json").read_text())["steps"]]
              for d in (full, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 9
    assert [p.name for p in (split / "checkpoints").iterdir()] == ["epoch-3"]


def test_resume_refuses_changed_options(setup, tmp_path, capsys):
    out = tmp_path / "run"
    _train(setup["llama"], setup["lm"], "--epochs", "1", "--r", "2", "--output-dir", out)
    code = main(["train", str(setup["llama"]), str(setup["lm"]), "--r", "4", "--batch-size", "4", "--lr",
                 "1e-2", "--epochs", "2", "--output-dir", str(out), "--resume"])
    assert code == 2 and "method_config" in capsys.readouterr().err


def test_prompt_tuning_trains_and_is_not_mergeable(setup, tmp_path, capsys):
    out = tmp_path / "prompt"
    _train(setup["llama"], setup["lm"], "--method", "prompt_tuning", "--num-virtual-tokens", "4",
           "--epochs", "1", "--output-dir", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    info = _inspect_json(out, capsys)
    assert info["layers"] == [] and info["tensors"][0]["name"] == "prompt_embeddings"
    assert info["tensors"][0]["shape"] == [4, 32]
    assert main(["merge", str(setup["llama"]), str(out), str(tmp_path / "merged")]) == 2
    assert "prompt methods" in capsys.readouterr().err
