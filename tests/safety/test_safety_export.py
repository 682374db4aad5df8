"""Merged exports of tied-embedding models, and merged exports carry no adapter files.

One-sided adapters on tied embeddings. With tie_word_embeddings=True and an adapter on one side only (lm_head
or embed_tokens, no ensure_weight_tying), HF PEFT 0.21.2 warns and then merges into the one shared tensor: the
other side changes too, so its merged model no longer computes what its adapted model did (checked in
`test_hf_merge_changes_both_sides`). fastpeft gives the merging layer its own copy, sets
config.tie_word_embeddings=False (both logged), so the merged model and its saved-and-reloaded copy give the
*unmerged* adapted outputs; the oracle is HF PEFT's unmerged model with the same adapter file, both ways
(HF file -> fastpeft export, fastpeft file -> HF outputs).
Exports without adapter files. merge_and_unload / unload + the transformers model's save_pretrained write the
model only: no adapter config or weights, no peft_config attribute left on the model (as HF PEFT), same files
as HF PEFT's export.
"""

from __future__ import annotations

import logging
import os

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import fastpeft
from fastpeft import registry
from fastpeft.core.layer import AdapterHolder

from cases import METHOD_CASES
from models import MODELS, forward, perturb

IDS = torch.tensor([[1, 5, 7, 9, 3, 2], [4, 8, 15, 16, 23, 42]])
ATOL = 1e-4
TYING = "fastpeft.core.tying"


def make_tied():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager", tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora(lib, targets, **kwargs):
    return lib.LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                          task_type="CAUSAL_LM", **kwargs)


def adapted(lib, config, seed=0):
    model = lib.get_peft_model(make_tied(), config)
    return perturb(model, seed, 0.05).eval()


def hf_unmerged(folder) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(make_tied(), str(folder)).eval())


def embedding_weights(model):
    return model.get_input_embeddings().weight, model.get_output_embeddings().weight


def assert_export(merged, expected, folder, tied: bool) -> None:
    """The merged model and its save_pretrained + from_pretrained copy give `expected`; tying as stated."""
    emb, head = embedding_weights(merged)
    assert (emb is head) == tied and merged.config.tie_word_embeddings == tied
    torch.testing.assert_close(logits(merged), expected, atol=ATOL, rtol=ATOL)
    merged.save_pretrained(str(folder))
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=ATOL, rtol=ATOL)
    emb, head = embedding_weights(reloaded)
    assert (emb.data_ptr() == head.data_ptr()) == tied


# ---------------------------------------------------------------------- one-sided adapters on tied embeddings
ONE_SIDED = {"head": ["lm_head", "q_proj"], "embed": ["embed_tokens", "q_proj"],
             "both": ["embed_tokens", "lm_head"]}


def test_one_sided_adapter_on_tied_embeddings_warns_like_hf():
    for lib in (fastpeft, peft):
        with pytest.warns(UserWarning, match="tie_word_embeddings"):
            lib.get_peft_model(make_tied(), lora(lib, ["lm_head"]))


def test_hf_merge_changes_both_sides():
    """HF PEFT's behaviour (the reason fastpeft unties the merged side): its merged model differs from its
    adapted model."""
    theirs = adapted(peft, lora(peft, ["lm_head"]))
    expected, embedding = logits(theirs), make_tied().get_input_embeddings().weight
    merged = theirs.merge_and_unload()
    assert not torch.equal(merged.get_input_embeddings().weight, embedding)
    assert not torch.allclose(logits(merged), expected, atol=1e-3)


@pytest.mark.parametrize("side", sorted(ONE_SIDED))
def test_merged_export_of_one_sided_adapter_unties(side, tmp_path, caplog):
    ours = adapted(fastpeft, lora(fastpeft, ONE_SIDED[side]))
    ours.save_pretrained(str(tmp_path / "adapter"))
    expected = hf_unmerged(tmp_path / "adapter")  # fastpeft file -> HF PEFT's unmerged outputs
    torch.testing.assert_close(logits(ours), expected, atol=ATOL, rtol=ATOL)
    original = {k: v.clone() for k, v in make_tied().state_dict().items()}
    with caplog.at_level(logging.WARNING, logger=TYING):
        merged = ours.merge_and_unload()
    assert "tie_word_embeddings=False" in caplog.text and "own copy" in caplog.text
    emb, head = embedding_weights(merged)
    if side == "head":
        assert torch.equal(emb, original["model.embed_tokens.weight"])
    if side == "embed":
        assert torch.equal(head, original["lm_head.weight"])
    assert_export(merged, expected, tmp_path / "merged", tied=False)


def test_hf_adapter_on_tied_head_exports_merged_in_fastpeft(tmp_path):
    theirs = adapted(peft, lora(peft, ["lm_head"]), seed=3)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = fastpeft.PeftModel.from_pretrained(make_tied(), str(tmp_path / "adapter"))
    assert_export(ours.merge_and_unload(), logits(theirs), tmp_path / "merged", tied=False)


def test_merge_adapter_in_place_keeps_outputs_and_embedding(tmp_path):
    ours = adapted(fastpeft, lora(fastpeft, ["lm_head"]))
    expected, embedding = logits(ours), make_tied().get_input_embeddings().weight
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours), expected, atol=ATOL, rtol=ATOL)
    assert torch.equal(ours.get_input_embeddings().weight, embedding)
    ours.unmerge_adapter()
    torch.testing.assert_close(logits(ours), expected, atol=ATOL, rtol=ATOL)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(make_tied()), atol=ATOL, rtol=ATOL)


def test_ensure_weight_tying_export_stays_tied(tmp_path, caplog):
    """Both sides share one adapter: the merge changes the one tensor for both, nothing is untied."""
    ours = adapted(fastpeft, lora(fastpeft, ["lm_head", "q_proj"], ensure_weight_tying=True))
    ours.save_pretrained(str(tmp_path / "adapter"))
    expected = hf_unmerged(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger=TYING):
        merged = ours.merge_and_unload()
    assert caplog.text == ""
    assert_export(merged, expected, tmp_path / "merged", tied=True)


def test_modules_to_save_head_export_unties(tmp_path, caplog):
    ours = adapted(fastpeft, fastpeft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    ours.save_pretrained(str(tmp_path / "adapter"))
    expected = hf_unmerged(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger=TYING):
        merged = ours.merge_and_unload()
    assert "tie_word_embeddings=False" in caplog.text
    assert_export(merged, expected, tmp_path / "merged", tied=False)


def test_tied_trainable_tokens_export_stays_tied(tmp_path):
    config = {"target_modules": ["embed_tokens"], "token_indices": [1, 5, 9]}
    ours = adapted(fastpeft, fastpeft.TrainableTokensConfig(**config))
    ours.save_pretrained(str(tmp_path / "adapter"))
    expected = hf_unmerged(tmp_path / "adapter")
    torch.testing.assert_close(logits(ours), expected, atol=ATOL, rtol=ATOL)
    assert_export(ours.merge_and_unload(), expected, tmp_path / "merged", tied=True)


# ---------------------------------------------------------------------- merged exports carry no adapter files
EXPORT_ROWS = [c for c in METHOD_CASES if c.id in ("lora-llama", "dora-llama", "ia3-llama", "loha-llama",
                                                   "oft-llama", "vera-llama")]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}


def config_of(lib, case):
    kwargs = dict(case.kwargs, task_type=getattr(lib.TaskType, case.kwargs["task_type"]))
    if lib is peft:
        return getattr(peft, case.method)(**kwargs)
    return next(s.config_cls for s in registry.registered().values()
                if s.config_cls.__name__ == case.method)(**kwargs)


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
@pytest.mark.parametrize("case", EXPORT_ROWS, ids=lambda c: c.id)
def test_export_writes_no_adapter_files(case, unload, tmp_path):
    factory, inputs = MODELS[case.model]
    exports = {}
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = perturb(lib.get_peft_model(factory(), config_of(lib, case)), 0, 0.1).eval()
        plain = getattr(model, unload)()
        assert "peft_config" not in plain.__dict__ and not hasattr(plain, "peft_config")
        assert not any(isinstance(m, AdapterHolder) for m in plain.modules())
        plain.save_pretrained(str(tmp_path / lib.__name__))
        exports[lib] = plain
    files = {lib: set(os.listdir(tmp_path / lib.__name__)) for lib in exports}
    assert files[fastpeft] == files[peft] and not files[fastpeft] & ADAPTER_FILES
    ours, theirs = exports[fastpeft].state_dict(), exports[peft].state_dict()
    assert sorted(ours) == sorted(theirs) == sorted(factory().state_dict())
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=ATOL, rtol=ATOL, msg=key)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fastpeft")).eval()
    torch.testing.assert_close(forward(reloaded, inputs()), forward(exports[peft], inputs()),
                               atol=1e-4, rtol=1e-4)


def test_export_can_be_adapted_again():
    model = fastpeft.get_peft_model(make_tied(), lora(fastpeft, ["q_proj"])).merge_and_unload()
    again = fastpeft.get_peft_model(model, lora(fastpeft, ["v_proj"]))
    assert list(again.peft_config) == ["default"]
