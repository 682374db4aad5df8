"""Poly / MHR (PolyConfig) against HF PEFT 0.21.2 as the oracle: outputs, gradients, files both ways,
generate.

Poly needs task_ids on every call. HF's PolyModel takes them in forward / generate (for custom models call its
`base_model`, since HF's plain PeftModel.forward hands task_ids to the user's model); fastpeft's PeftModel
takes them directly.
"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.poly import PolyConfig
from state_helpers import copy_adapter

from models import make_llama, make_mlp, make_t5, perturb, t5_inputs
from oracle_helpers import assert_same_files, assert_same_state_dict

MLP_KW = {"r": 4, "n_tasks": 3, "n_skills": 3, "n_splits": 2, "target_modules": ["lin0", "lin1"]}
TASKS = torch.tensor([0, 2, 1])


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


def mlp_x():
    # HF's Poly needs (batch, seq, dim)
    return torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(3))


def pair(make, config_kwargs, seed=0):
    """The same base and adapter (init seeded alike, then perturbed) in HF PEFT and fastpeft, in eval mode."""
    torch.manual_seed(seed)
    hf = peft.get_peft_model(make(), peft.PolyConfig(**config_kwargs))
    torch.manual_seed(seed)
    fp = fastpeft.get_peft_model(make(), PolyConfig(**config_kwargs))
    perturb(hf, seed=seed)
    copy_adapter(peft, hf, fastpeft, fp)
    return hf.eval(), fp.eval()


# ---------------------------------------------------------------------------------------------- custom model
@pytest.mark.parametrize("init_weights", [True, False])
def test_same_seed_same_init(init_weights):
    kw = {**MLP_KW, "init_weights": init_weights}
    torch.manual_seed(7)
    hf = peft.get_peft_model(make_mlp(), peft.PolyConfig(**kw))
    torch.manual_seed(7)
    fp = fastpeft.get_peft_model(make_mlp(), PolyConfig(**kw))
    assert_same_state_dict(fastpeft.get_peft_model_state_dict(fp), peft.get_peft_model_state_dict(hf))


@pytest.mark.parametrize("n_splits", [1, 2])
def test_mlp_outputs_and_training_step_match(n_splits):
    hf, fp = pair(make_mlp, {**MLP_KW, "n_splits": n_splits})
    x = mlp_x()
    close(fp(x, task_ids=TASKS), hf.base_model(x, task_ids=TASKS))
    close(fp.base_model(x, task_ids=TASKS), hf.base_model(x, task_ids=TASKS))  # the tuner takes task_ids too
    # (batch, features) inputs, which HF PEFT's bmm path cannot take, act like one-token sequences
    close(fp(x[:, 0], task_ids=TASKS), hf.base_model(x[:, :1], task_ids=TASKS)[:, 0])
    hf.train()
    fp.train()
    torch.manual_seed(11)  # training samples the router's relaxed Bernoulli gates: same draws on both sides
    out_hf = hf.base_model(x, task_ids=TASKS)
    torch.manual_seed(11)
    out_fp = fp(x, task_ids=TASKS)
    close(out_fp, out_hf)
    out_hf.pow(2).mean().backward()
    out_fp.pow(2).mean().backward()
    grads_hf = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    grads_fp = {n: p.grad for n, p in fp.named_parameters() if p.requires_grad}
    assert grads_hf.keys() == grads_fp.keys() and grads_hf
    for name, grad in grads_hf.items():
        close(grads_fp[name], grad)


def test_files_both_directions(tmp_path):
    hf, fp = pair(make_mlp, MLP_KW)
    x = mlp_x()
    expected = hf.base_model(x, task_ids=TASKS)
    hf.save_pretrained(tmp_path / "hf")
    fp.save_pretrained(tmp_path / "fp")
    assert_same_files(tmp_path / "fp", tmp_path / "hf")
    loaded_fp = fastpeft.PeftModel.from_pretrained(make_mlp(), tmp_path / "hf").eval()
    close(loaded_fp(x, task_ids=TASKS), expected)
    loaded_hf = peft.PeftModel.from_pretrained(make_mlp(), tmp_path / "fp").eval()
    close(loaded_hf.base_model(x, task_ids=TASKS), expected)


def test_multiple_adapters_and_disable_match():
    hf, fp = pair(make_mlp, MLP_KW)
    other = {**MLP_KW, "n_tasks": 2, "n_skills": 2, "r": 2}
    hf.add_adapter("other", peft.PolyConfig(**other))
    fp.add_adapter("other", PolyConfig(**other))
    # HF PEFT builds the new router in training mode (sampling gates); fastpeft follows the base's mode
    hf.eval()
    perturb(hf, seed=5, wanted=lambda n: ".other" in n)
    copy_adapter(peft, hf, fastpeft, fp, "other")
    x, tasks = mlp_x(), torch.tensor([1, 0, 1])
    close(fp(x, task_ids=tasks), hf.base_model(x, task_ids=tasks))  # "default" still active
    hf.set_adapter("other")
    fp.set_adapter("other")
    close(fp(x, task_ids=tasks), hf.base_model(x, task_ids=tasks))
    with fp.disable_adapter(), hf.disable_adapter():
        close(fp(x), hf.base_model(x))  # no task needed while disabled
        close(fp(x), make_mlp()(x))
    fp.delete_adapter("other")
    hf.delete_adapter("other")
    close(fp(x, task_ids=tasks), hf.base_model(x, task_ids=tasks))


def test_mixed_batch_uses_each_rows_adapter_and_task():
    _, fp = pair(make_mlp, MLP_KW)
    fp.add_adapter("other", PolyConfig(**MLP_KW))
    perturb(fp, seed=5, wanted=lambda n: ".other" in n)
    x, names = mlp_x(), ["other", "__base__", "default"]
    mixed = fp(x, task_ids=TASKS, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            close(mixed[i], make_mlp()(x[i:i + 1])[0])
            continue
        fp.set_adapter(name)
        close(mixed[i], fp(x[i:i + 1], task_ids=TASKS[i:i + 1])[0])


def test_bad_task_ids_and_merge_are_refused():
    hf, fp = pair(make_mlp, MLP_KW)
    x = mlp_x()
    with pytest.raises(ValueError):  # HF PEFT refuses missing task_ids too
        hf.base_model(x)
    with pytest.raises(ValueError, match="task_ids"):
        fp(x)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fp(x, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fp(x, task_ids=torch.tensor([0, -1, 1]))  # HF would silently index from the end
    with pytest.raises(ValueError, match="integer"):
        fp(x, task_ids=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="batch of 3 rows"):
        fp(x, task_ids=torch.tensor([0, 1]))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        fp.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        fp.merge_and_unload()
    close(fp.unload()(x), make_mlp()(x))


def test_config_and_layer_checks():
    with pytest.raises(ValueError, match="n_tasks"):
        PolyConfig(n_tasks=0)
    with pytest.raises(ValueError, match="poly_type"):
        PolyConfig(poly_type="mhr")
    with pytest.raises(ValueError, match="n_splits=3 does not divide"):
        fastpeft.get_peft_model(make_mlp(), PolyConfig(n_splits=3, target_modules=["lin1"]))
    with pytest.raises(ValueError, match="cannot wrap"):
        fastpeft.get_peft_model(make_mlp(), PolyConfig(target_modules=["act"]))


# ---------------------------------------------------------------------------------------------- transformers
def test_t5_forward_generate_and_default_targets():
    kw = {"r": 4, "n_tasks": 3, "n_skills": 2, "n_splits": 2, "task_type": "SEQ_2_SEQ_LM"}
    hf, fp = pair(make_t5, kw)
    assert fp.peft_config["default"].target_modules == {"q", "v"}
    inputs, tasks = t5_inputs(), torch.tensor([2, 1])
    close(fp(**inputs, task_ids=tasks).logits, hf(**inputs, task_ids=tasks).logits)
    gen = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "max_new_tokens": 4,
           "do_sample": False}
    assert torch.equal(fp.generate(**gen, task_ids=tasks), hf.generate(**gen, task_ids=tasks))
    # beams: the encoder runs once per input row, the decoder per beam (HF PEFT's Poly fails here); each row's
    # beams must follow that row's task, as when the row is generated alone
    gen.update(num_beams=2, num_return_sequences=2)
    both = fp.generate(**gen, task_ids=tasks)
    for i in range(2):
        alone = fp.generate(**{k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in gen.items()},
                            task_ids=tasks[i:i + 1])
        assert torch.equal(both[2 * i:2 * i + 2], alone)


def test_llama_forward_training_and_generate():
    kw = {"r": 4, "n_tasks": 2, "n_skills": 3, "target_modules": ["q_proj", "v_proj", "down_proj"],
          "task_type": "CAUSAL_LM"}
    hf, fp = pair(make_llama, kw)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    tasks = torch.tensor([1, 0])
    close(fp(input_ids=ids, task_ids=tasks).logits, hf(input_ids=ids, task_ids=tasks).logits)
    hf.train()
    fp.train()
    torch.manual_seed(2)
    loss_hf = hf(input_ids=ids, labels=ids, task_ids=tasks).loss
    torch.manual_seed(2)
    loss_fp = fp(input_ids=ids, labels=ids, task_ids=tasks).loss
    close(loss_fp, loss_hf)
    loss_hf.backward()
    loss_fp.backward()
    grads_fp = {n: p.grad for n, p in fp.named_parameters() if p.requires_grad}
    assert grads_fp.keys() == {n for n, p in hf.named_parameters() if p.requires_grad}
    for name, param in hf.named_parameters():
        if param.requires_grad:
            close(grads_fp[name], param.grad)
    hf.eval()
    fp.eval()
    gen = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False}
    assert torch.equal(fp.generate(**gen, task_ids=tasks), hf.generate(**gen, task_ids=tasks))
    # fastpeft repeats each row's task for its beams; HF PEFT needs them repeated by hand (its prompt is
    # expanded before the first forward, so that works there for decoder-only models)
    gen.update(num_beams=2, num_return_sequences=2)
    expected = hf.generate(**gen, task_ids=tasks.repeat_interleave(2))
    assert torch.equal(fp.generate(**gen, task_ids=tasks), expected)
    with pytest.raises(ValueError, match="task_ids"):
        fp.generate(input_ids=ids, max_new_tokens=2)
