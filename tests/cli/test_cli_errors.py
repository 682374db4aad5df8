"""Bad input to the ``fastpeft`` subcommands: exit code 2 and a message naming the file, column or option.

Also ``--help`` for each command and the generic mapping of config dataclass fields to flags.
"""

from __future__ import annotations

import json

import pytest

from cli_models import write_csv, write_jsonl
from fastpeft.cli import build_parser, main
from fastpeft.cli.options import flag_values, method_fields, resolve_method


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_missing_dataset_names_the_file(tmp_path, capsys):
    err = _error(["train", "some-model", tmp_path / "nope.jsonl"], capsys)
    assert "nope.jsonl" in err and "not found" in err


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_dataset_names_the_file(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("\n" if name.endswith("jsonl") else "text,label\n")
    err = _error(["train", "some-model", path], capsys)
    assert name in err and "empty" in err


def test_missing_column_lists_columns_found(tmp_path, capsys):
    path = write_csv(tmp_path / "data.csv", [{"sentence": "w3 w4", "label": 1}])
    err = _error(["train", "some-model", path, "--task", "seq-cls"], capsys)
    assert "'text'" in err and "data.csv" in err and "label, sentence" in err


def test_missing_label_column_for_classification(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "w3 w4"}])
    err = _error(["train", "some-model", path, "--task", "seq-cls"], capsys)
    assert "'label'" in err and "data.jsonl" in err and "columns found: text" in err


def test_unsupported_data_format(tmp_path, capsys):
    path = tmp_path / "data.parquet"
    path.write_text("x")
    assert "data.parquet" in _error(["train", "some-model", path], capsys)


def test_unknown_method_lists_known_ones(tmp_path, capsys):
    err = _error(["train", "some-model", tmp_path / "d.jsonl", "--method", "magic"], capsys)
    assert "'magic'" in err and "lora" in err and "prompt_tuning" in err


def test_option_of_another_method_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "m", str(tmp_path / "d.jsonl"), "--method", "prompt_tuning", "--r", "4"])
    assert exc.value.code == 2 and "--r" in capsys.readouterr().err


def test_unknown_config_file_option(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w3"}])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"r": 4, "rank": 8}))
    err = _error(["train", "m", data, "--config", cfg], capsys)
    assert "rank" in err and "LoraConfig" in err


@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_adapter_folder_without_config(tmp_path, capsys, command):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    argv = [command, tmp_path] if command == "inspect" else [command, "base", tmp_path, tmp_path / "out"]
    err = _error(argv, capsys)
    assert str(tmp_path) in err and "adapter_config.json" in err


def test_merge_into_non_empty_folder_needs_overwrite(tmp_path, capsys):
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    adapter.mkdir()
    out.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (out / "keep.txt").write_text("x")
    err = _error(["merge", "base", adapter, out], capsys)
    assert str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").is_file()


@pytest.mark.parametrize("command, flags", [
    ("train", ["--method", "--task", "--epochs", "--lr", "--batch-size", "--max-length", "--output-dir",
               "--resume", "--config", "--r", "--lora-alpha", "--target-modules", "lora_only"]),
    ("inspect", ["--json", "ADAPTER"]),
    ("merge", ["--overwrite", "--safe-merge", "BASE", "ADAPTER", "OUT"]),
])
def test_command_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags), [f for f in flags if f not in out]


def test_top_level_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "inspect", "merge", "demo"))


def test_prompt_tuning_help_shows_its_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "prompt_tuning", "--help"])
    out = capsys.readouterr().out
    assert "--num-virtual-tokens" in out and "--lora-alpha" not in out


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning", "cpt"])
def test_every_config_field_becomes_a_flag(method):
    spec = resolve_method(method)
    parser = build_parser(method)
    train = parser._subparsers._group_actions[0].choices["train"]
    options = {opt for action in train._actions for opt in action.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in method_fields(spec.config_cls)} <= options


def test_flag_values_are_typed_from_annotations():
    spec = resolve_method("lora")
    args = build_parser().parse_args([
        "train", "m", "d.jsonl", "--r", "4", "--lora-dropout", "0.1", "--use-rslora", "--target-modules",
        "q_proj", "--exclude-modules", ".*mlp.*", "--rank-pattern", '{"q_proj": 2}', "--init-lora-weights",
        "gaussian", "--layers-to-transform", "0", "1"])
    assert flag_values(args, spec.config_cls) == {
        "r": 4, "lora_dropout": 0.1, "use_rslora": True, "target_modules": ["q_proj"],
        "exclude_modules": ".*mlp.*", "rank_pattern": {"q_proj": 2}, "init_lora_weights": "gaussian",
        "layers_to_transform": [0, 1]}
    args = build_parser().parse_args(["train", "m", "d.jsonl", "--target-modules", "all-linear",
                                      "--init-lora-weights", "false"])
    assert flag_values(args, spec.config_cls) == {"target_modules": "all-linear", "init_lora_weights": False}
