"""Trainable tokens (TRAINABLE_TOKENS and LoRA's trainable_token_indices / ensure_weight_tying) vs HF PEFT."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.trainable_tokens import TrainableTokensConfig

import models

IDS = [1, 5, 7, 42]
OTHER_IDS = [3, 9]


def make_llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager", tie_word_embeddings=True)
    torch.manual_seed(models.SEED)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2_untied():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=1, attn_implementation="eager", tie_word_embeddings=False)
    torch.manual_seed(models.SEED)
    return GPT2LMHeadModel(cfg).eval()


FACTORIES = {"llama": models.make_llama, "llama_tied": make_llama_tied, "gpt2": models.make_gpt2,
             "gpt2_untied": make_gpt2_untied}


def inputs():
    ids, mask = models._token_inputs(10, 100)
    ids[0, :4] = torch.tensor(IDS)  # make sure the trained tokens occur
    return {"input_ids": ids, "attention_mask": mask}


def tt_config(lib, **kw):
    cls = peft.TrainableTokensConfig if lib is peft else TrainableTokensConfig
    return cls(**{"token_indices": list(IDS), **kw})


def lora_config(lib, **kw):
    return lib.LoraConfig(**{"target_modules": ["c_attn", "q_proj"], "r": 4, **kw})


# (id, model, config builder, kwargs)
CASES = [
    ("tt_llama", "llama", tt_config, {}),
    ("tt_llama_tied", "llama_tied", tt_config, {}),
    ("tt_gpt2_tied", "gpt2", tt_config, {}),
    ("tt_gpt2_untied", "gpt2_untied", tt_config, {}),
    ("tt_gpt2_list_targets", "gpt2", tt_config, {"target_modules": ["wte"]}),
    ("lora_llama_list", "llama", lora_config, {"trainable_token_indices": IDS}),
    ("lora_llama_tied_list", "llama_tied", lora_config, {"trainable_token_indices": IDS}),
    ("lora_gpt2_list", "gpt2", lora_config, {"trainable_token_indices": IDS}),
    ("lora_gpt2_untied_list", "gpt2_untied", lora_config, {"trainable_token_indices": IDS}),
    ("lora_gpt2_ensure_tying", "gpt2", lora_config,
     {"trainable_token_indices": IDS, "ensure_weight_tying": True}),
    ("lora_gpt2_dict_tied", "gpt2", lora_config, {"trainable_token_indices": {"wte": IDS, "lm_head": IDS}}),
    ("lora_gpt2_dict_mismatch", "gpt2", lora_config,
     {"trainable_token_indices": {"wte": IDS, "lm_head": OTHER_IDS}}),
    ("lora_gpt2_untied_dict", "gpt2_untied", lora_config,
     {"trainable_token_indices": {"wte": IDS, "lm_head": OTHER_IDS}}),
    ("lora_llama_dict_ensure", "llama_tied", lora_config,
     {"trainable_token_indices": {"embed_tokens": IDS, "lm_head": IDS}, "ensure_weight_tying": True}),
]
CASE_PARAMS = [pytest.param(c, id=c[0]) for c in CASES]


def build(lib, case):
    _, model, make_cfg, kw = case
    return lib.get_peft_model(FACTORIES[model](), make_cfg(lib, **kw))


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def assert_close(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("direction", ["hf_to_fastpeft", "fastpeft_to_hf"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_adapters_move_between_libraries(case, direction, tmp_path):
    src, dst = (peft, fastpeft) if direction == "hf_to_fastpeft" else (fastpeft, peft)
    x = inputs()
    base_out = models.forward(FACTORIES[case[1]](), x)
    model = build(src, case)
    perturb(model)
    model.eval()
    out = models.forward(model, x)
    assert (out - base_out).abs().max() > 1e-2, "the perturbed adapter must change the logits"
    model.save_pretrained(str(tmp_path))
    loaded = dst.PeftModel.from_pretrained(FACTORIES[case[1]](), str(tmp_path)).eval()
    assert_close(models.forward(loaded, x), out, f"{direction}: loaded vs saved model")


def _normalised(cfg: dict) -> dict:
    cfg = {k: v for k, v in cfg.items() if k != "peft_version"}
    return {k: sorted(v) if isinstance(v, list) else v for k, v in cfg.items()}


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_saved_files_match_hf(case, tmp_path):
    for lib, sub in ((fastpeft, "fp"), (peft, "hf")):
        build(lib, case).save_pretrained(str(tmp_path / sub))
    fp_sd, hf_sd = (load_file(str(tmp_path / s / "adapter_model.safetensors")) for s in ("fp", "hf"))
    assert {k: tuple(v.shape) for k, v in fp_sd.items()} == {k: tuple(v.shape) for k, v in hf_sd.items()}
    fp_cfg, hf_cfg = (json.loads((tmp_path / s / "adapter_config.json").read_text()) for s in ("fp", "hf"))
    assert _normalised(fp_cfg) == _normalised(hf_cfg)
    assert isinstance(fp_cfg["peft_version"], str) and fp_cfg["peft_version"]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_trainable_parameter_count_matches_hf(case):
    counts = [sum(p.numel() for p in build(lib, case).parameters() if p.requires_grad)
              for lib in (fastpeft, peft)]
    assert counts[0] == counts[1]


# ---------------------------------------------------------------------------------------------- behaviour
def _tt(model_name="gpt2", **kw):
    return fastpeft.get_peft_model(FACTORIES[model_name](), tt_config(fastpeft, **kw))


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_identity_at_init(model_name):
    x = inputs()
    base = models.forward(FACTORIES[model_name](), x)
    torch.testing.assert_close(models.forward(_tt(model_name), x), base, atol=1e-6, rtol=0)


def _embedding_weight(model):
    return model.get_input_embeddings().weight.detach().clone()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_optimizer_step_changes_only_the_chosen_rows(model_name):
    model = _tt(model_name).train()
    before = _embedding_weight(model.get_base_model())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(len(IDS), 32)]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    out = model(**inputs())
    out.logits.square().mean().backward()
    optimizer.step()
    assert torch.equal(_embedding_weight(model.get_base_model()), before), "the base weight must stay frozen"
    merged = _embedding_weight(model.merge_and_unload())
    others = [i for i in range(100) if i not in IDS]
    assert torch.equal(merged[others], before[others]), "rows outside token_indices changed"
    assert (merged[IDS] - before[IDS]).abs().amax(dim=1).min() > 0, "every chosen row must be updated"


@pytest.mark.parametrize("build_model", [
    lambda: _tt("gpt2"), lambda: _tt("llama"),
    lambda: fastpeft.get_peft_model(models.make_gpt2(), lora_config(fastpeft, trainable_token_indices=IDS)),
], ids=["tt_gpt2_tied", "tt_llama", "lora_gpt2_tied"])
def test_merge_and_unload_writes_rows_into_embedding_and_tied_head(build_model):
    x = inputs()
    model = build_model()
    perturb(model)
    model.eval()
    out = models.forward(model, x)
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n).detach().clone()
    merged = model.merge_and_unload()
    assert not any("trainable_tokens" in n for n, _ in merged.named_modules())
    assert_close(models.forward(merged, x), out, "merged vs adapted")
    assert torch.equal(merged.get_input_embeddings().weight[IDS], delta)
    if merged.config.tie_word_embeddings:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def test_merge_unmerge_and_unload_restore_the_base():
    x = inputs()
    base = models.forward(models.make_gpt2(), x)
    base_weight = models.make_gpt2().transformer.wte.weight.detach().clone()
    model = _tt("gpt2")
    perturb(model)
    model.eval()
    out = models.forward(model, x)
    model.merge_adapter()
    assert_close(models.forward(model, x), out, "merged forward")
    model.unmerge_adapter()
    assert torch.equal(model.get_base_model().transformer.wte.base_layer.weight, base_weight)
    with model.disable_adapter():
        assert_close(models.forward(model, x), base, "disabled adapter")
    unloaded = model.unload()
    assert type(unloaded.transformer.wte) is torch.nn.Embedding and type(unloaded.lm_head) is torch.nn.Linear
    assert torch.equal(unloaded.transformer.wte.weight, base_weight)
    assert_close(models.forward(unloaded, x), base, "unloaded vs base")


def test_mixed_batch_uses_each_samples_adapter():
    x = inputs()
    model = _tt("gpt2")
    model.add_adapter("other", tt_config(fastpeft, token_indices=[2, 5, 8]))
    perturb(model)
    model.eval()
    expected = []
    for name in ("default", "other"):
        model.set_adapter(name)
        expected.append(models.forward(model, x))
    mixed = models.forward(model, {**x, "adapter_names": ["other", "default"]})
    assert_close(mixed[0], expected[1][0], "sample 0 (other)")
    assert_close(mixed[1], expected[0][1], "sample 1 (default)")


def test_delete_adapter_removes_the_layers():
    model = _tt("gpt2")
    model.add_adapter("other", tt_config(fastpeft, token_indices=[2]))
    model.delete_adapter("default")
    assert model.get_base_model().lm_head.token_indices == {"other": [2]}
    model.delete_adapter("other")
    assert type(model.get_base_model().lm_head) is torch.nn.Linear


# ---------------------------------------------------------------------------------------------- errors
def test_index_out_of_vocab_is_refused():
    with pytest.raises(ValueError, match=r"(?s)Token index 100\b.*vocabulary size 100"):
        _tt("llama", token_indices=[1, 100])


def test_lora_index_out_of_vocab_is_refused_before_injection():
    model = models.make_gpt2()
    with pytest.raises(ValueError, match=r"(?s)Token index 250\b.*vocabulary size 100"):
        fastpeft.get_peft_model(model, lora_config(fastpeft, trainable_token_indices=[3, 250]))
    assert not any("lora" in n or "token" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("bad", [[-1], [3, 3], ["a"]])
def test_bad_index_lists_are_refused(bad):
    with pytest.raises(ValueError, match="token"):
        TrainableTokensConfig(token_indices=bad)


def test_ensure_weight_tying_with_different_indices_is_refused():
    cfg = lora_config(fastpeft, trainable_token_indices={"wte": IDS, "lm_head": OTHER_IDS},
                      ensure_weight_tying=True)
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        fastpeft.get_peft_model(models.make_gpt2(), cfg)


def test_token_indices_and_modules_to_save_on_the_same_layer_are_refused():
    cfg = lora_config(fastpeft, trainable_token_indices={"wte": IDS}, modules_to_save=["wte"])
    with pytest.raises(ValueError, match="modules_to_save"):
        fastpeft.get_peft_model(models.make_gpt2(), cfg)


def test_tt_with_embed_tokens_target_saves_no_full_embedding(tmp_path):
    _tt("llama", target_modules=["embed_tokens"]).save_pretrained(str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {"base_model.model.model.embed_tokens.trainable_tokens_delta"}
