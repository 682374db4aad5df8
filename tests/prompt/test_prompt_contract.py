"""Soft-prompt methods: contract properties (training, save/load, disable, several adapters) and bad input.
"""

from __future__ import annotations

import peft  # noqa: E402
import pytest
import torch

import fastpeft  # noqa: E402

import models
from prompt_helpers import (
    BASES,
    MAIN_METHODS,
    N,
    _labelled,
    _prompt_ids,
    assert_close,
    fp_adapter,
    make_bert_qa,
    make_bert_token_cls,
    make_config,
    outputs,
    perturb,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------
# 3. contract
# ----------------------------------------------------------------------------------------------

GRAD_CASES = [("llama", m) for m in MAIN_METHODS] + [("t5", "prompt_tuning"), ("t5", "prefix"),
                                                      ("bert_seq_cls", "prompt_tuning"),
                                                      ("bert_seq_cls", "p_tuning_mlp"),
                                                      ("bert_token_cls", "prompt_tuning"),
                                                      ("bert_qa", "p_tuning_lstm"), ("bert_bare", "prefix")]


@pytest.mark.parametrize(("base_name", "method"), GRAD_CASES, ids=[f"{b}-{m}" for b, m in GRAD_CASES])
def test_only_prompt_encoder_and_heads_train(base_name, method):
    make, _, task = BASES[base_name]
    fp_model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))
    hf_model = peft.get_peft_model(make(), make_config(peft, method, task))
    fp_trainable = {n for n, p in fp_model.named_parameters() if p.requires_grad}
    hf_trainable = {n for n, p in hf_model.named_parameters() if p.requires_grad}
    assert fp_trainable == hf_trainable
    assert {n for n, _ in fp_model.named_parameters()} == {n for n, _ in hf_model.named_parameters()}
    heads = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}
    for name in fp_trainable:
        assert name.startswith("prompt_encoder.default.") or (
            task in heads and ".modules_to_save.default." in name), name
    assert any(n.startswith("prompt_encoder.default.") for n in fp_trainable)
    assert (task in heads) == any(".modules_to_save." in n for n in fp_trainable)


TRAIN_CASES = [("llama", m) for m in MAIN_METHODS] + [("gpt2", "prefix"), ("t5", "prompt_tuning"),
                                                       ("t5", "prefix_projection"),
                                                       ("bert_seq_cls", "p_tuning_mlp")]


@pytest.mark.parametrize(("base_name", "method"), TRAIN_CASES, ids=[f"{b}-{m}" for b, m in TRAIN_CASES])
def test_adamw_steps_lower_the_loss(base_name, method):
    make, inputs_fn, task = BASES[base_name]
    model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))
    frozen = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()
              if not p.requires_grad}
    encoder = {n: p.detach().clone() for n, p in model.prompt_encoder.named_parameters()}
    inputs = _labelled(base_name, inputs_fn())

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**inputs).loss.item()

    start = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(8):
        model.train()
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < start - 1e-3, (start, end)
    for n, p in model.get_base_model().named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen base parameter {n} changed"
    for n, p in model.prompt_encoder.named_parameters():
        # trained encoder parameters move; frozen ones (a cartridge's attention-sink rows) stay
        assert torch.equal(p, encoder[n]) != p.requires_grad, f"encoder parameter {n}"


ROUNDTRIP_CASES = [(b, m) for b in ("llama", "t5") for m in MAIN_METHODS] + [
    ("bert_seq_cls", "p_tuning_lstm"), ("bert_bare", "prefix_projection")]


@pytest.mark.parametrize(("base_name", "method"), ROUNDTRIP_CASES,
                         ids=[f"{b}-{m}" for b, m in ROUNDTRIP_CASES])
def test_save_load_roundtrip(base_name, method, tmp_path):
    make, inputs_fn, _ = BASES[base_name]
    inputs = inputs_fn()
    model = fp_adapter(base_name, method)
    before = outputs(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    assert loaded.peft_config["default"].inference_mode is True
    torch.testing.assert_close(outputs(loaded, inputs), before, atol=1e-6, rtol=0)
    # the model that saved is unchanged by saving
    assert model.peft_config["default"].inference_mode is False
    torch.testing.assert_close(outputs(model, inputs), before, atol=0, rtol=0)


DISABLE_CASES = [("llama", "prompt_tuning"), ("llama", "p_tuning_lstm"), ("llama", "prefix"),
                 ("gpt2", "prefix_projection"), ("t5", "prompt_tuning"), ("t5", "prefix"),
                 ("bert_seq_cls", "prompt_tuning"), ("bert_bare", "prefix")]


@pytest.mark.parametrize(("base_name", "method"), DISABLE_CASES, ids=[f"{b}-{m}" for b, m in DISABLE_CASES])
def test_disable_adapter_gives_base_model(base_name, method):
    make, inputs_fn, _ = BASES[base_name]
    inputs = inputs_fn()
    base_out = outputs(make(), inputs)
    model = fastpeft.get_peft_model(make(), make_config(fastpeft, method, BASES[base_name][2]))
    perturb(model, 6)
    model.eval()
    adapted = outputs(model, inputs)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with model.disable_adapter():
        assert torch.equal(outputs(model, inputs), base_out)
    assert torch.equal(outputs(model, inputs), adapted)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


def test_disable_adapter_generate_is_base_generate():
    model = fp_adapter("llama", "prompt_tuning", seed=3)
    ids = _prompt_ids(12)
    kw = {"max_new_tokens": 5, "do_sample": False}
    with model.disable_adapter():
        disabled = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(disabled, models.make_llama().generate(input_ids=ids,
                                                              attention_mask=torch.ones_like(ids), **kw))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_two_prompt_adapters(method, tmp_path):
    inputs = models.llama_inputs()
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, "CAUSAL_LM"))
    perturb(model, 7)
    model.add_adapter("other", make_config(fastpeft, method, "CAUSAL_LM"))
    assert model.active_adapter == "default"
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("prompt_encoder.other.")}
    perturb(model, 8)  # only "other" is trainable now
    model.eval()
    out_other = outputs(model, inputs)
    model.set_adapter("default")
    out_default = outputs(model, inputs)
    assert (out_other - out_default).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    hf_model = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path).eval()
    assert_close(outputs(hf_model, inputs), out_default, "HF default")
    hf_model.load_adapter(tmp_path / "other", adapter_name="other")
    hf_model.set_adapter("other")
    assert_close(outputs(hf_model, inputs), out_other, "HF other")

    model.set_adapter("other")
    model.delete_adapter("other")
    assert set(model.peft_config) == {"default"} and model.active_adapter == "default"
    assert not any(n.startswith("prompt_encoder.other.") for n, _ in model.named_parameters())
    assert_close(outputs(model, inputs), out_default, "after delete_adapter")


def test_adapters_of_different_prompt_types_are_refused():
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "prompt_tuning", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="PREFIX_TUNING|PROMPT_TUNING"):
        model.add_adapter("other", make_config(fastpeft, "prefix", "CAUSAL_LM"))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix"])
def test_merge_and_unload_is_refused(method):
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, "CAUSAL_LM"))
    for call in (model.merge_and_unload, model.merge_adapter, model.unload):
        with pytest.raises(ValueError, match="prompt"):
            call()


# ----------------------------------------------------------------------------------------------
# 4. bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, None])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_bad_num_virtual_tokens(method, n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fastpeft.get_peft_model(models.make_llama(),
                                make_config(fastpeft, method, "CAUSAL_LM", num_virtual_tokens=n))


def test_text_init_needs_tokenizer_and_text():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="w1 w2")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                    tokenizer_name_or_path="somewhere")


@pytest.mark.parametrize("make", [models.make_llama, models.make_gpt2])
def test_prefix_with_gradient_checkpointing_is_refused(make):
    base = make()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fastpeft.get_peft_model(base, make_config(fastpeft, "prefix", "CAUSAL_LM"))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix"])
def test_trainable_load_is_refused(method, tmp_path):
    fp_adapter("llama", method).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is_trainable"):
        fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path, is_trainable=True)
    model = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path)
    with pytest.raises(ValueError, match="is_trainable"):
        model.load_adapter(tmp_path, adapter_name="again", is_trainable=True)
    assert set(model.peft_config) == {"default"}


def test_positional_forward_args():
    ids = models.llama_inputs()["input_ids"]
    config = make_config(fastpeft, "prompt_tuning", "CAUSAL_LM")
    generic = fastpeft.PeftModel(models.make_llama(), config)
    with pytest.raises(TypeError, match="keyword"):
        generic(ids)
    # the task class names input_ids first, as HF PEFT's does: a positional call is that keyword
    task_model = fastpeft.get_peft_model(models.make_llama(),
                                         make_config(fastpeft, "prompt_tuning", "CAUSAL_LM"))
    torch.testing.assert_close(outputs(task_model, {}, input_ids=ids), task_model(ids).logits.detach())


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix"])
def test_task_type_none_is_refused(method):
    with pytest.raises(ValueError, match="task_type"):
        fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, method, None))


@pytest.mark.parametrize("make", [models.make_bert_cls, make_bert_token_cls, make_bert_qa])
@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_prefix_on_bert_heads_is_refused_at_creation(make, method):
    task = {"BertForSequenceClassification": "SEQ_CLS", "BertForTokenClassification": "TOKEN_CLS",
            "BertForQuestionAnswering": "QUESTION_ANS"}[type(make()).__name__]
    with pytest.raises(ValueError, match="(?i)prefix tuning.*cache"):
        fastpeft.get_peft_model(make(), make_config(fastpeft, method, task))


def test_forward_without_inputs_is_refused():
    model = fastpeft.get_peft_model(models.make_llama(), make_config(fastpeft, "prompt_tuning", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="input_ids"):
        model(attention_mask=torch.ones(1, 3, dtype=torch.long))

