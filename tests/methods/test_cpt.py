"""CPT (context-aware prompt tuning): files and logits against HF PEFT, the CPT loss, training rules,
generate.

HF PEFT is the oracle.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.cpt import CPTConfig
from fastpeft.methods.cpt.model import cpt_loss, cpt_targets, projection_radii

import models

IDS = [5, 6, 7, 8, 9, 10]
TYPES = [1, 2, 2, 3, 4, 5]  # template, input x2, template, label, next example's template
INPUT_TYPES = torch.tensor([[1, 2, 3, 4, 5, 8], [1, 2, 3, 4, 0, 0]])
MODELS = {"llama": (models.make_llama, models.llama_inputs), "gpt2": (models.make_gpt2, models.gpt2_inputs)}


def _config(lib, **overrides):
    kw = dict(task_type="CAUSAL_LM", cpt_token_ids=IDS, cpt_mask=[1] * len(IDS), cpt_tokens_type_mask=TYPES)
    kw.update(overrides)
    return (peft.CPTConfig if lib is peft else CPTConfig)(**kw)


def _pair(model_name, **overrides):
    make = MODELS[model_name][0]
    hf = peft.get_peft_model(make(), _config(peft, **overrides))
    fp = fastpeft.get_peft_model(make(), _config(fastpeft, **overrides))
    return hf, fp


def _perturb(model, seed=3, scale=0.05):
    """A change large enough that some rows are cut back by the projection."""
    g = torch.Generator().manual_seed(seed)
    delta = model.prompt_encoder["default"].delta_embedding.weight
    with torch.no_grad():
        delta.copy_(torch.randn(delta.shape, generator=g) * scale)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _saved(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_hf_adapter_loads_into_fastpeft(model_name, tmp_path):
    make, inputs_fn = MODELS[model_name]
    hf = peft.get_peft_model(make(), _config(peft))
    _perturb(hf)
    inputs = inputs_fn()
    expected = _logits(hf, inputs)
    hf.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(make(), tmp_path)
    assert loaded.peft_config["default"].inference_mode
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_fastpeft_adapter_loads_into_hf_with_same_files(model_name, tmp_path):
    make, inputs_fn = MODELS[model_name]
    hf, fp = _pair(model_name, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    _perturb(hf)
    _perturb(fp)
    inputs = inputs_fn()
    expected = _logits(fp, inputs)
    torch.testing.assert_close(expected, _logits(hf, inputs), atol=1e-5, rtol=0)
    fp.save_pretrained(tmp_path / "fp")
    hf.save_pretrained(tmp_path / "hf")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "fp")
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=0)
    (fp_cfg, fp_w), (hf_cfg, hf_w) = _saved(tmp_path / "fp"), _saved(tmp_path / "hf")
    assert {k: tuple(v.shape) for k, v in fp_w.items()} == {k: tuple(v.shape) for k, v in hf_w.items()} == {
        "prompt_embeddings": (len(IDS), 32)}
    torch.testing.assert_close(fp_w["prompt_embeddings"], hf_w["prompt_embeddings"], atol=1e-6, rtol=0)
    assert set(fp_cfg) == set(hf_cfg)
    for key in set(hf_cfg) - {"peft_version"}:
        assert fp_cfg[key] == hf_cfg[key], key


def test_saved_prompt_is_base_plus_projected_change(tmp_path):
    _, fp = _pair("llama")
    _perturb(fp, scale=1.0)
    encoder = fp.prompt_encoder["default"]
    fp.save_pretrained(tmp_path)
    saved = _saved(tmp_path)[1]["prompt_embeddings"]
    change = saved - encoder.embedding.weight
    radii = projection_radii(fp.peft_config["default"])
    assert torch.allclose(change.norm(dim=1), radii, rtol=1e-4)  # every row was longer than its radius
    assert abs(radii[1].item() - 0.1 * (32 / 2048) ** 0.5) < 1e-7


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("loss_type", ["none", "decay"])
@pytest.mark.parametrize("with_types", [True, False])
def test_loss_matches_hf(model_name, loss_type, with_types):
    hf, fp = _pair(model_name, opt_weighted_loss_type=loss_type, opt_loss_decay_factor=0.5)
    _perturb(hf)
    _perturb(fp)
    inputs = MODELS[model_name][1]()
    labels = inputs["input_ids"].clone()
    extra = {"input_type_mask": INPUT_TYPES.clone()} if with_types else {}
    hf_loss = hf(**inputs, labels=labels, **extra).loss
    extra = {"input_type_mask": INPUT_TYPES.clone()} if with_types else {}
    fp_loss = fp(**inputs, labels=labels, **extra).loss
    torch.testing.assert_close(fp_loss, hf_loss, atol=1e-6, rtol=0)


def test_decay_weighs_older_examples_less():
    config = _config(fastpeft, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.0)
    logits = torch.randn(1, len(IDS) + 4, 100)
    labels = torch.arange(20, 24)[None]
    targets, types = cpt_targets(config, labels, torch.tensor([[1, 2, 3, 4]]))
    decayed = cpt_loss(logits, targets, types, config)
    config.opt_weighted_loss_type = "none"
    plain = cpt_loss(logits, targets, types, config)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0, 1:], reduction="none",
                                           ignore_index=-100)
    # input types shift by 5 to [6, 7, 8, 9]: labels are the prompt's type 4 and the input's 8 (the newest)
    label_ce = ce[targets[0, 1:] != -100]
    assert label_ce.shape == (2,)
    torch.testing.assert_close(plain, label_ce.mean())
    torch.testing.assert_close(decayed, label_ce[1] / 2)  # factor 0: the older example does not count


def test_targets_follow_type_mask():
    config = _config(fastpeft, cpt_token_ids=[5, 6, 7, 8, 9], cpt_mask=[1] * 5,
                     cpt_tokens_type_mask=[1, 2, 2, 3, 4])
    user_types = torch.tensor([[1, 2, 3, 4]])
    targets, types = cpt_targets(config, torch.tensor([[10, 11, 12, 13]]), user_types)
    assert targets.tolist() == [[-100, -100, -100, -100, 9, -100, -100, -100, 13]]
    assert types.tolist() == [[1, 2, 2, 3, 4, 5, 6, 7, 8]]
    assert user_types.tolist() == [[1, 2, 3, 4]]  # HF PEFT shifts the caller's tensor in place; we do not
    with pytest.raises(ValueError, match="input_type_mask has shape"):
        cpt_targets(config, torch.tensor([[10, 11, 12, 13]]), torch.tensor([[1, 2]]))


def test_loss_uses_the_active_adapters_config():
    """HF PEFT reads the loss settings of the adapter named "default" whatever is active."""
    model = fastpeft.get_peft_model(models.make_llama(), _config(fastpeft, opt_weighted_loss_type="decay",
                                                                 opt_loss_decay_factor=0.0),
                                    adapter_name="ctx")
    inputs = models.llama_inputs()
    labels = inputs["input_ids"]
    out = model(**inputs, labels=labels, input_type_mask=INPUT_TYPES)
    targets, types = cpt_targets(model.peft_config["ctx"], labels, INPUT_TYPES)
    torch.testing.assert_close(out.loss, cpt_loss(out.logits, targets, types, model.peft_config["ctx"]))
    model.peft_config["ctx"].opt_weighted_loss_type = "none"
    assert not torch.allclose(model(**inputs, labels=labels, input_type_mask=INPUT_TYPES).loss, out.loss)


def test_only_allowed_rows_of_the_change_train():
    _, fp = _pair("llama")
    encoder = fp.prompt_encoder["default"]
    trainable = {n for n, p in fp.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.delta_embedding.weight"}
    base_before = encoder.embedding.weight.clone()
    inputs = models.llama_inputs()
    batch = dict(inputs, labels=inputs["input_ids"], input_type_mask=INPUT_TYPES)
    optimizer = torch.optim.SGD([encoder.delta_embedding.weight], lr=0.5)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = fp(**batch).loss
        loss.backward()
        grad = encoder.delta_embedding.weight.grad
        assert grad[4].abs().sum() == 0 and grad[:4].abs().sum() > 0  # row 4 is a label token
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(encoder.embedding.weight, base_before)
    fp(**inputs)  # the forward projects the stored change back inside the radii
    norms = encoder.delta_embedding.weight.norm(dim=1)
    assert (norms <= projection_radii(fp.peft_config["default"]) * (1 + 1e-5)).all()


def test_generate_matches_greedy_forward_loop():
    _, fp = _pair("gpt2")
    _perturb(fp)
    ids = models.gpt2_inputs()["input_ids"][:1]
    out = fp.generate(input_ids=ids, max_new_tokens=5, do_sample=False, input_type_mask=torch.ones_like(ids))
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            nxt = fp(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()


def test_config_defaults_and_errors():
    config = CPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    assert (config.cpt_token_ids, config.cpt_mask, config.cpt_tokens_type_mask) == ([0], [1], [1])
    assert config.num_virtual_tokens == 1 and config.num_transformer_submodules == 1
    assert config.peft_type == "CPT" and config.opt_weighted_loss_type == "none"
    with pytest.raises(ValueError, match="only supports task_type = CAUSAL_LM"):
        CPTConfig(task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="only supports task_type = CAUSAL_LM"):
        CPTConfig()
    with pytest.raises(ValueError, match="must have the same length"):
        CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1])
    with pytest.raises(ValueError, match="opt_weighted_loss_type"):
        CPTConfig(task_type="CAUSAL_LM", opt_weighted_loss_type="linear")
    hf_fields = set(peft.CPTConfig(task_type="CAUSAL_LM").to_dict())
    assert set(CPTConfig(task_type="CAUSAL_LM").to_dict()) == hf_fields
