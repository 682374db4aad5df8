"""Adaption prompt (LLaMA-Adapter): parity with HF PEFT 0.21 on tiny Llama / Mistral (GQA) / GPT-2 models.

Adapters move both ways with equal outputs and equal files; plus init identity, training, generate, errors,
disable / unload, multiple adapters and mixed batches.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open

import fastpeft
from fastpeft.methods.adaption_prompt import AdaptionPromptConfig

import models

ATOL = 1e-5


def make_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                        sliding_window=None, attn_implementation="eager")
    models._seeded()
    return MistralForCausalLM(cfg).eval()


# family -> (model factory, inputs, adapter_layers, attention module path of the top layer)
FAMILIES = {
    "llama": (models.make_llama, models.llama_inputs, 1, "model.layers.1.self_attn"),
    "mistral": (make_mistral, models.llama_inputs, 2, "model.layers.1.self_attn"),
    "gpt2": (models.make_gpt2, models.gpt2_inputs, 2, "transformer.h.1.attn"),
}


def config_kwargs(family, **extra):
    return {"adapter_len": 3, "adapter_layers": FAMILIES[family][2], "task_type": "CAUSAL_LM", **extra}


def hf_model(family, **extra):
    return peft.get_peft_model(FAMILIES[family][0](),
                               peft.AdaptionPromptConfig(**config_kwargs(family, **extra)))


def fp_model(family, **extra):
    return fastpeft.get_peft_model(FAMILIES[family][0](),
                                   AdaptionPromptConfig(**config_kwargs(family, **extra)))


def perturb(model, seed=7):
    """Non-zero gates and new prompts, so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adaption_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * (2.0 if "gate" in name else 1.0))
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def file_tensors(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def file_config(folder):
    data = json.loads((folder / "adapter_config.json").read_text())
    data.pop("peft_version", None)
    return {k: sorted(v) if isinstance(v, list) else v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_adapter_loads_in_fastpeft(family, tmp_path):
    factory, inputs_fn, _, _ = FAMILIES[family]
    hf = perturb(hf_model(family)).eval()
    inputs = inputs_fn()
    hf_out = logits(hf, inputs)
    assert not torch.allclose(hf_out, logits(factory(), inputs), atol=1e-3), "perturbed adapter must matter"
    hf.save_pretrained(tmp_path)
    fp = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path))
    torch.testing.assert_close(logits(fp, inputs), hf_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastpeft_adapter_loads_in_hf(family, tmp_path):
    factory, inputs_fn, _, _ = FAMILIES[family]
    fp = perturb(fp_model(family)).eval()
    inputs = inputs_fn()
    fp_out = logits(fp, inputs)
    fp.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(hf, inputs), fp_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_files_match_hf(family, tmp_path):
    hf_dir, fp_dir = tmp_path / "hf", tmp_path / "fp"
    hf_model(family).save_pretrained(hf_dir)
    fp_model(family).save_pretrained(fp_dir)
    hf_t, fp_t = file_tensors(hf_dir), file_tensors(fp_dir)
    assert {k: tuple(v.shape) for k, v in fp_t.items()} == {k: tuple(v.shape) for k, v in hf_t.items()}
    top = FAMILIES[family][3]
    assert f"base_model.model.{top}.adaption_prompt" in fp_t
    assert f"base_model.model.{top}.adaption_gate" in fp_t
    assert file_config(fp_dir) == file_config(hf_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_init_and_state_dict_names(family):
    torch.manual_seed(3)
    hf = hf_model(family)
    torch.manual_seed(3)
    fp = fp_model(family)
    hf_sd = peft.get_peft_model_state_dict(hf)
    fp_sd = fastpeft.get_peft_model_state_dict(fp)
    assert hf_sd.keys() == fp_sd.keys()
    for key in hf_sd:
        torch.testing.assert_close(fp_sd[key], hf_sd[key], atol=0, rtol=0)
    # the wrapped attention is kept as `.model`, so base weights have HF PEFT's full state-dict names
    base_keys = {k for k in hf.state_dict() if ".adaption_" not in k}
    assert {k for k in fp.state_dict() if ".adaption_" not in k} == base_keys


def test_two_adapters_match_hf(tmp_path):
    inputs = models.llama_inputs()
    hf = perturb(hf_model("llama"))
    hf.add_adapter("other",
                   peft.AdaptionPromptConfig(**config_kwargs("llama", adapter_layers=2, adapter_len=2)))
    perturb(hf, seed=11)  # only the active adapter's modules are in HF's model: re-perturb after switching
    hf.set_adapter("other")
    perturb(hf, seed=12)
    hf.eval()
    expected = {"other": logits(hf, inputs)}
    hf.set_adapter("default")
    expected["default"] = logits(hf, inputs)
    hf.save_pretrained(tmp_path)
    fp = fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path))
    fp.load_adapter(str(tmp_path / "other"), "other")
    for name in ("other", "default"):
        fp.set_adapter(name)
        torch.testing.assert_close(logits(fp, inputs), expected[name], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_and_only_prompts_train(family):
    factory, inputs_fn, _, _ = FAMILIES[family]
    inputs = inputs_fn()
    fp = fp_model(family)
    torch.testing.assert_close(logits(fp, inputs), logits(factory(), inputs), atol=0, rtol=0)
    trainable = {n.split(".")[-2] for n, p in fp.named_parameters() if p.requires_grad}
    assert trainable == {"adaption_prompt", "adaption_gate"}
    hf_count = sum(p.numel() for p in hf_model(family).parameters() if p.requires_grad)
    assert fp.get_nb_trainable_parameters()[0] == hf_count


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_lowers_loss(family):
    factory, inputs_fn, _, _ = FAMILIES[family]
    fp = fp_model(family)
    fp.train()
    inputs = inputs_fn()
    batch = {**inputs, "labels": inputs["input_ids"]}
    opt = torch.optim.Adam([p for p in fp.parameters() if p.requires_grad], lr=0.05)
    before = {n: p.detach().clone() for n, p in fp.named_parameters()}
    losses = []
    for _ in range(6):
        loss = fp(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    changed = {n for n, p in fp.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adaption_" in n for n in changed)


def manual_greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_hf_and_manual_loop(family, tmp_path):
    factory, inputs_fn, _, _ = FAMILIES[family]
    hf = perturb(hf_model(family)).eval()
    hf.save_pretrained(tmp_path)
    fp = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path))
    ids = inputs_fn()["input_ids"][:1]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        hf_ids = hf.generate(input_ids=ids, **kwargs)
        fp_ids = fp.generate(input_ids=ids, **kwargs)
    base_ids = factory().generate(input_ids=ids, **kwargs)
    assert torch.equal(fp_ids, hf_ids)
    steps = fp_ids.shape[1] - ids.shape[1]  # fewer than 5 if an eos token was generated
    assert steps > 0 and torch.equal(fp_ids, manual_greedy(fp, ids, steps))
    assert not torch.equal(fp_ids, base_ids), "the adapter should change the generated tokens"


@pytest.mark.parametrize("factory", [models.make_bert_cls, models.make_t5])
def test_unsupported_model_type(factory):
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt"):
        fastpeft.get_peft_model(factory(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


@pytest.mark.parametrize("kwargs, match", [
    ({"adapter_len": 2, "adapter_layers": 5}, "more adapter layers '5' than the model has '2'"),
    ({"adapter_len": None, "adapter_layers": 1}, "adapter_len must be a positive integer"),
    ({"adapter_len": 2}, "adapter_layers must be a positive integer"),
])
def test_bad_sizes(kwargs, match):
    model = models.make_llama()
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(model, AdaptionPromptConfig(**kwargs))
    assert not any("adaption" in n for n, _ in model.named_parameters())


def test_disable_adapter_gives_base_outputs():
    inputs = models.llama_inputs()
    base = logits(models.make_llama(), inputs)
    fp = perturb(fp_model("llama"))
    adapted = logits(fp, inputs)
    with fp.disable_adapter():
        torch.testing.assert_close(logits(fp, inputs), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(fp, inputs), adapted, atol=0, rtol=0)
    assert all(p.requires_grad for n, p in fp.named_parameters() if ".adaption_" in n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unload_returns_original_modules(family):
    factory, inputs_fn, _, top = FAMILIES[family]
    model = factory()
    original = model.get_submodule(top)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp = perturb(fastpeft.get_peft_model(model, AdaptionPromptConfig(**config_kwargs(family))))
    with pytest.raises(ValueError, match="cannot be merged"):
        fp.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        fp.merge_adapter()
    unloaded = fp.unload()
    assert unloaded is model and model.get_submodule(top) is original
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(logits(unloaded, inputs_fn()), logits(factory(), inputs_fn()), atol=0, rtol=0)


def test_delete_and_mixed_batch():
    inputs = models.llama_inputs()
    fp = perturb(fp_model("llama"))
    fp.add_adapter("other", AdaptionPromptConfig(**config_kwargs("llama", adapter_layers=2)))
    perturb(fp, seed=5)
    per_adapter = {}
    for name in ("default", "other"):
        fp.set_adapter(name)
        per_adapter[name] = logits(fp, inputs)
    per_adapter["__base__"] = logits(models.make_llama(), inputs)
    names = ["other", "__base__"]
    with torch.no_grad():
        mixed = fp(**inputs, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], atol=ATOL, rtol=0)
    fp.delete_adapter("other")
    assert fp.active_adapters == ["default"]
    assert isinstance(fp.get_base_model().model.layers[0].self_attn, type(models.make_llama().model.layers[0]
                                                                          .self_attn))
    torch.testing.assert_close(logits(fp, inputs), per_adapter["default"], atol=0, rtol=0)
    with pytest.raises(TypeError, match="cannot be stacked"):
        from fastpeft.methods.adaption_prompt.layer import LlamaAdaptedAttention

        LlamaAdaptedAttention(fp.get_base_model().model.layers[1].self_attn, "x", fp.peft_config["default"])
