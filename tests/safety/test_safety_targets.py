"""What an adapter config selects - random new heads, entries that select nothing,
targets that cannot be adapted. HF PEFT 0.21.2 is the oracle; each docstring says what it does."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.core import checks
from fastpeft.errors import AdapterConfigError

import models

ATOL = 1e-5
NEW_HEAD = "newly initialised"


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def lora(lib, base=None, **kw):
    kw = {"target_modules": ["q_proj", "v_proj"], "r": 4, "init_lora_weights": False, **kw}
    return lib.get_peft_model(base if base is not None else models.make_llama(), lib.LoraConfig(**kw))


def head_warnings(record) -> list[str]:
    return [str(w.message) for w in record if NEW_HEAD in str(w.message)]


# ------------------------------------------------------------------------------------------- random new heads
@pytest.fixture(scope="module")
def causal_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    models.make_llama().save_pretrained(folder)
    return folder


def seq_cls(folder):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(3)
    return LlamaForSequenceClassification.from_pretrained(folder, num_labels=3, pad_token_id=0).eval()


def test_random_head_not_saved_warns_with_the_fix(causal_checkpoint, tmp_path):
    """HF PEFT (task_type=None on a ...ForSequenceClassification loaded from a causal-LM checkpoint): no
    warning; the random `score` head stays frozen and is not in the saved file, so every reload gets another
    random head. fastpeft warns at wrap time, naming the module and the fix (modules_to_save or task_type)."""
    theirs = lora(peft, seq_cls(causal_checkpoint))
    theirs.save_pretrained(tmp_path / "hf")
    assert not any("score" in k for k in load_file(tmp_path / "hf" / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match=r"'score': 'Linear'.*modules_to_save=\['score'\]"):
        lora(fastpeft, seq_cls(causal_checkpoint))
    # loading such an adapter onto a fresh model: same warning
    with pytest.warns(UserWarning, match=NEW_HEAD):
        fastpeft.PeftModel.from_pretrained(seq_cls(causal_checkpoint), tmp_path / "hf")


@pytest.mark.parametrize("kw", [{"task_type": "SEQ_CLS"}, {"modules_to_save": ["score"]}],
                         ids=["task", "mts"])
def test_saved_head_gives_no_warning_and_matches_hf(causal_checkpoint, tmp_path, kw):
    """With the head trained and saved (task_type SEQ_CLS or modules_to_save) there is nothing to warn about;
    the adapter files and outputs are HF PEFT's."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = lora(fastpeft, seq_cls(causal_checkpoint), **kw)
    assert head_warnings(record) == []
    theirs = lora(peft, seq_cls(causal_checkpoint), **kw)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "hf")
    a, b = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "ours", tmp_path / "hf"))
    assert a.keys() == b.keys() and any("score" in k for k in a)
    inputs = models.llama_inputs()
    close(ours(**inputs).logits, theirs(**inputs).logits)


def test_strict_mode_makes_the_head_warning_an_error(causal_checkpoint, monkeypatch):
    with checks.strict(), pytest.raises(AdapterConfigError, match="strict mode"):
        lora(fastpeft, seq_cls(causal_checkpoint))
    monkeypatch.setenv("FASTPEFT_STRICT", "1")
    with pytest.raises(AdapterConfigError, match=NEW_HEAD):
        lora(fastpeft, seq_cls(causal_checkpoint))
    with checks.strict(False), pytest.warns(UserWarning, match=NEW_HEAD):
        lora(fastpeft, seq_cls(causal_checkpoint))


def test_head_by_class_name_without_loading_flags():
    """A model built from a config carries no loading flags: the class's known head (BERT's `classifier`)
    counts."""
    with pytest.warns(UserWarning, match=r"'classifier'.*modules_to_save=\['classifier'\]"):
        fastpeft.get_peft_model(models.make_bert_cls(), fastpeft.LoraConfig(target_modules=["query"]))


# -------------------------------------------------------------------------------- entries that select nothing
@pytest.mark.parametrize("kw, found", [
    ({"rank_pattern": {"q_prj": 2}}, r"rank_pattern key 'q_prj' matches no targeted module.*'q_proj'"),
    ({"alpha_pattern": {"layers.1.v_prj": 2}}, r"alpha_pattern key 'layers.1.v_prj'.*v_proj"),
    ({"exclude_modules": ["layers.0.q_proj", "v_prj"]},
     r"exclude_modules entry 'v_prj' matches no module.*v_proj"),
    ({"exclude_modules": r".*\.q_prj"},
     r"exclude_modules='.\*\\\\.q_prj' \(a full-match regex\) matches no module"),
    ({"layers_to_transform": [0, 7]}, r"layers_to_transform indices \[7\] .* indices are \[0, 1\]"),
], ids=["rank", "alpha", "exclude_list", "exclude_regex", "layers"])
def test_entries_that_select_nothing_are_errors(kw, found):
    """HF PEFT: rank_pattern / alpha_pattern keys that match nothing give a warning ("did not match any
    targeted module and were ignored"); an unmatched exclude_modules entry warns only when nothing at all was
    excluded; an unmatched layers_to_transform index is silent. All build a model that trains something else
    than asked. fastpeft refuses each with the closest module names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora(peft, **kw)  # HF PEFT builds the model
    with pytest.raises(AdapterConfigError, match=found):
        lora(fastpeft, **kw)


VALID = {"rank_pattern": {"q_proj": 2, r"layers\.1\.v_proj": 3}, "alpha_pattern": {"layers.0.v_proj": 16},
         "exclude_modules": ["layers.1.q_proj"], "layers_to_transform": [0, 1]}


def test_valid_entries_build_hf_adapters_both_ways(tmp_path):
    """Entries that do select modules keep working, with HF PEFT's ranks, scalings and files both ways."""
    theirs = lora(peft, **VALID).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "hf")
    inputs = models.llama_inputs()
    close(ours(**inputs).logits, theirs(**inputs).logits)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "ours")
    close(back(**inputs).logits, theirs(**inputs).logits)
    shapes = {k: tuple(v.shape)
              for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    assert shapes == {k: tuple(v.shape)
                      for k, v in load_file(tmp_path / "hf" / "adapter_model.safetensors").items()}


def test_stale_entry_in_a_saved_file_only_warns(tmp_path):
    """A file HF PEFT saved with a dead rank_pattern key still loads (the weights decide; HF PEFT loads it
    with a warning): fastpeft warns and gives HF PEFT's outputs. Strict mode refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lora(peft, rank_pattern={"q_prj": 2}).eval()
    theirs.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="rank_pattern key 'q_prj'"):
        ours = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "hf")
    inputs = models.llama_inputs()
    close(ours(**inputs).logits, theirs(**inputs).logits)
    with pytest.warns(UserWarning, match="rank_pattern key 'q_prj'"):
        ours.load_adapter(tmp_path / "hf", adapter_name="again")
    with checks.strict(), pytest.raises(AdapterConfigError, match="rank_pattern key 'q_prj'"):
        fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "hf")


# ----------------------------------------------------------------------------- targets that cannot be adapted
def test_unsupported_targets_are_all_listed():
    """HF PEFT raises ValueError at the first matched module it cannot wrap (printing the whole module).
    fastpeft raises one error (also a ValueError) listing every such module with its type, and the
    exclude_modules fix."""
    with pytest.raises(ValueError, match="is not supported"):
        lora(peft, target_modules=["q_proj", "mlp", "act_fn"])
    with pytest.raises(ValueError) as info:
        lora(fastpeft, target_modules=["q_proj", "mlp", "act_fn"])
    message = str(info.value)
    assert isinstance(info.value, AdapterConfigError)
    assert "4 module(s) matched by target_modules cannot be adapted" in message
    assert "exclude_modules=['act_fn', 'mlp']" in message
    for layer in (0, 1):
        assert f"'model.layers.{layer}.mlp': 'LlamaMLP'" in message
        assert f"'model.layers.{layer}.mlp.act_fn': 'SiLUActivation'" in message


def test_the_suggested_fix_builds_hf_adapter():
    """Following the message (exclude_modules) gives the same adapter as HF PEFT with the same config."""
    kw = {"target_modules": ["q_proj", "mlp", "act_fn"], "exclude_modules": ["act_fn", "mlp"]}
    theirs, ours = lora(peft, **kw).eval(), lora(fastpeft, **kw).eval()
    inputs = models.llama_inputs()
    close(ours(**inputs).logits, theirs(**inputs).logits)
    assert {k for k in ours.state_dict() if "lora_" in k} == {k for k in theirs.state_dict() if "lora_" in k}
