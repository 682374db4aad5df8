"""MULTITASK_PROMPT_TUNING: files and outputs against HF PEFT (the oracle), generate, training, task_ids,
inits.

Adapter tensors are perturbed before saving (the default task matrices are ~N(0, 0.02), which would make the
prompts nearly zero), so a tensor dropped, mis-keyed or applied to the wrong task changes the outputs.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.methods.multitask_prompt_tuning import (
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
)

import models

ATOL = 1e-5
N, TASKS, RANKS = 4, 3, 2
TASK_IDS = torch.tensor([2, 0])
MODELS = {
    "CAUSAL_LM": (models.make_llama, models.llama_inputs),
    "SEQ_2_SEQ_LM": (models.make_t5, models.t5_inputs),
    "SEQ_CLS": (models.make_bert_cls, models.bert_cls_inputs),
}


def make_config(lib, task, **kwargs):
    cls = MultitaskPromptTuningConfig if lib is fastpeft else peft.MultitaskPromptTuningConfig
    return cls(task_type=task, **{"num_virtual_tokens": N, "num_tasks": TASKS, "num_ranks": RANKS, **kwargs})


def task_inputs(task):
    inputs = MODELS[task][1]()
    if task == "SEQ_2_SEQ_LM":  # decoder rows need labels (HF PEFT derives the decoder inputs from them)
        inputs["labels"] = inputs.pop("decoder_input_ids")
    return inputs


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * (0.5 if "prefix_task" in name else 1.0))
    return model


def outputs(model, inputs, task_ids=TASK_IDS):
    with torch.no_grad():
        out = model(**inputs, task_ids=task_ids)
    return out.logits, getattr(out, "loss", None)


def assert_same_outputs(a, b):
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=0)
    if a[1] is not None or b[1] is not None:
        torch.testing.assert_close(a[1], b[1], atol=ATOL, rtol=0)


def saved(path):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    config = json.loads((path / "adapter_config.json").read_text())
    return {k: tuple(v.shape) for k, v in tensors.items()}, config


def comparable(config):
    out = dict(config)
    out.pop("peft_version", None)
    return {k: set(v) if isinstance(v, list) else v for k, v in out.items()}  # HF repeats modules_to_save


# ---------------------------------------------------------------------------------------------- config
def test_config_fields_and_defaults_match_hf():
    ours = {f.name: f.default for f in dataclasses.fields(MultitaskPromptTuningConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.MultitaskPromptTuningConfig)}
    assert ours == theirs
    assert {e.value for e in MultitaskPromptTuningInit} == {e.value for e in peft.MultitaskPromptTuningInit}
    assert MultitaskPromptTuningConfig().peft_type == "MULTITASK_PROMPT_TUNING"
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        MultitaskPromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB")


# ---------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("task", list(MODELS))
def test_hf_adapter_loads_in_fastpeft(task, tmp_path):
    factory = MODELS[task][0]
    hf = perturb(peft.get_peft_model(factory(), make_config(peft, task))).eval()
    expected = outputs(hf, task_inputs(task))
    hf.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert_same_outputs(outputs(ours, task_inputs(task)), expected)
    other = outputs(ours, task_inputs(task), task_ids=torch.tensor([1, 1]))
    assert not torch.allclose(other[0], expected[0], atol=1e-3), "task_ids had no effect"


@pytest.mark.parametrize("task", list(MODELS))
def test_fastpeft_adapter_loads_in_hf_and_files_match(task, tmp_path):
    factory = MODELS[task][0]
    ours = perturb(fastpeft.get_peft_model(factory(), make_config(fastpeft, task))).eval()
    expected = outputs(ours, task_inputs(task))
    ours.save_pretrained(str(tmp_path / "fp"))
    hf = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "fp")).eval()
    assert_same_outputs(outputs(hf, task_inputs(task)), expected)
    peft.get_peft_model(factory(), make_config(peft, task)).save_pretrained(str(tmp_path / "hf"))
    fp_keys, fp_config = saved(tmp_path / "fp")
    hf_keys, hf_config = saved(tmp_path / "hf")
    assert fp_keys == hf_keys
    assert fp_keys["prefix_task_cols"][:2] == (TASKS, N * (2 if task == "SEQ_2_SEQ_LM" else 1))
    assert comparable(fp_config) == comparable(hf_config)


def test_seq2seq_single_submodule_matches_hf(tmp_path):
    hf = perturb(peft.get_peft_model(models.make_t5(), make_config(
        peft, "SEQ_2_SEQ_LM", num_transformer_submodules=1))).eval()
    expected = outputs(hf, task_inputs("SEQ_2_SEQ_LM"))
    hf.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(models.make_t5(), str(tmp_path)).eval()
    assert_same_outputs(outputs(ours, task_inputs("SEQ_2_SEQ_LM")), expected)


def test_seq2seq_decoder_inputs_embeds_match_hf(tmp_path):
    hf = perturb(peft.get_peft_model(models.make_t5(), make_config(peft, "SEQ_2_SEQ_LM"))).eval()
    hf.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(models.make_t5(), str(tmp_path)).eval()
    inputs = models.t5_inputs()
    dec = inputs.pop("decoder_input_ids")
    inputs["decoder_inputs_embeds"] = models.make_t5().get_input_embeddings()(dec).detach()
    inputs["decoder_attention_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert_same_outputs(outputs(ours, dict(inputs)), outputs(hf, dict(inputs)))


def test_seq2seq_decoder_input_ids_give_clear_error():
    model = fastpeft.get_peft_model(models.make_t5(), make_config(fastpeft, "SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="decoder_inputs_embeds"):
        model(**models.t5_inputs(), task_ids=TASK_IDS)


# ---------------------------------------------------------------------------------------------- generate
def greedy(model, input_ids, task_ids, steps):
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=task_ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_causal_generate_matches_manual_greedy_loop():
    model = perturb(fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "CAUSAL_LM"))).eval()
    input_ids = models.llama_inputs()["input_ids"]
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), task_ids=TASK_IDS,
                         max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy(model, input_ids, TASK_IDS, 6))
    other = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           task_ids=torch.tensor([0, 2]), max_new_tokens=6, do_sample=False)
    assert not torch.equal(out, other), "task_ids did not reach generate"


def test_seq2seq_generate_matches_hf(tmp_path):
    hf = perturb(peft.get_peft_model(models.make_t5(), make_config(peft, "SEQ_2_SEQ_LM"))).eval()
    hf.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(models.make_t5(), str(tmp_path)).eval()
    inputs = models.t5_inputs()
    inputs.pop("decoder_input_ids")
    kwargs = dict(task_ids=TASK_IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **kwargs), hf.generate(**inputs, **kwargs))


# ---------------------------------------------------------------------------------------------- training
def test_only_prompt_parameters_train_and_loss_drops():
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "CAUSAL_LM"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_encoder.default.{k}" for k in
                         ("embedding.weight", "prefix_task_cols", "prefix_task_rows")}
    inputs = models.llama_inputs()
    inputs["labels"] = inputs["input_ids"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(**inputs, task_ids=TASK_IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("task", list(MODELS))
def test_missing_task_ids_is_a_clear_error(task):
    model = fastpeft.get_peft_model(MODELS[task][0](), make_config(fastpeft, task))
    with pytest.raises(ValueError, match="task_ids"):
        model(**task_inputs(task))
    if task != "SEQ_CLS":
        ids = models.llama_inputs()["input_ids"]
        with pytest.raises(ValueError, match="task_ids"):
            model.generate(input_ids=ids, max_new_tokens=2)


def test_out_of_range_task_ids_is_a_clear_error():
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "CAUSAL_LM"))
    with pytest.raises(ValueError, match="num_tasks"):
        model(**models.llama_inputs(), task_ids=torch.tensor([0, TASKS]))


# ---------------------------------------------------------------------------------------------- source inits
@pytest.fixture
def source_file(tmp_path):
    tensors = {"prompt_embeddings": torch.randn(N, 32), "prefix_task_cols": torch.randn(TASKS, N, RANKS),
               "prefix_task_rows": torch.randn(TASKS, RANKS, 32)}
    save_file(tensors, str(tmp_path / "source.safetensors"))
    torch.save(tensors, str(tmp_path / "source.bin"))
    return tmp_path, tensors


def source_encoder(lib, init, path, **kwargs):
    config = make_config(lib, "CAUSAL_LM", prompt_tuning_init=init,
                         prompt_tuning_init_state_dict_path=str(path), **{"num_tasks": 1, **kwargs})
    return lib.get_peft_model(models.make_llama(), config).prompt_encoder["default"]


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_source_task_init_reproduces_the_file(init, suffix, source_file):
    folder, tensors = source_file
    path = folder / f"source.{suffix}"
    extra = {"prompt_tuning_init_task": 1} if init == "EXACT_SOURCE_TASK" else {}
    ours, theirs = source_encoder(fastpeft, init, path, **extra), source_encoder(peft, init, path, **extra)
    assert torch.equal(ours.embedding.weight, tensors["prompt_embeddings"])
    if init == "ONLY_SOURCE_SHARED":
        assert ours.prefix_task_cols.abs().max() < 0.2  # still the small random init
        return
    expected_cols = tensors["prefix_task_cols"].mean(0, keepdim=True) if init == "AVERAGE_SOURCE_TASKS" else \
        tensors["prefix_task_cols"][1:2]
    torch.testing.assert_close(ours.prefix_task_cols.data, expected_cols, atol=0, rtol=0)
    torch.testing.assert_close(ours.prefix_task_rows.data, theirs.prefix_task_rows.data, atol=0, rtol=0)


def test_source_init_errors_are_clear(source_file):
    folder, _ = source_file
    with pytest.raises(ValueError, match="prompt_tuning_init_state_dict_path"):
        fastpeft.get_peft_model(models.make_llama(), make_config(
            fastpeft, "CAUSAL_LM", prompt_tuning_init="AVERAGE_SOURCE_TASKS"))
    with pytest.raises(ValueError, match="num_tasks=1"):
        source_encoder(fastpeft, "AVERAGE_SOURCE_TASKS", folder / "source.safetensors", num_tasks=TASKS)
    save_file({"prompt_embeddings": torch.randn(N, 32)}, str(folder / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        source_encoder(fastpeft, "EXACT_SOURCE_TASK", folder / "partial.safetensors")
