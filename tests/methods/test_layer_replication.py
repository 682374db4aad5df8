"""LoRA `layer_replication` on a tiny Llama: structure, weight sharing, parity with HF PEFT, files, training,
errors."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora import replication

import models

# layer_map -> which original block sits at each position of the new stack
PATTERNS = {
    "0-1-1": ([[0, 2], [1, 2]], [0, 1, 1]),
    "0-0-1-1": ([[0, 1], [0, 2], [1, 2]], [0, 0, 1, 1]),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(lib, layer_map, **kw):
    kw = {"target_modules": TARGETS, **kw}
    return lib.LoraConfig(r=4, lora_alpha=8, layer_replication=layer_map, **kw)


def _fast(layer_map):
    return fastpeft.get_peft_model(models.make_llama(), _config(fastpeft, layer_map))


def _hf(layer_map):
    return peft.get_peft_model(models.make_llama(), _config(peft, layer_map))


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def _copy_lora(src, dst):
    dst_params = dict(dst.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in src.named_parameters():
            if "lora_" in name:
                dst_params[name].copy_(param)
                copied += 1
    assert copied == sum("lora_" in n for n in dst_params)


def _logits(model):
    with torch.no_grad():
        return model(**models.llama_inputs()).logits


def _blocks(model):
    return model.base_model.model.model.layers


@pytest.fixture(params=list(PATTERNS), ids=list(PATTERNS))
def pattern(request):
    return PATTERNS[request.param]


def test_stack_depth_config_and_layer_idx(pattern):
    layer_map, sources = pattern
    model = _fast(layer_map)
    blocks = _blocks(model)
    assert len(blocks) == len(sources)
    assert model.base_model.model.config.num_hidden_layers == len(sources)
    assert [b.self_attn.layer_idx for b in blocks] == list(range(len(sources)))


def test_copies_share_base_weights_but_not_lora(pattern):
    layer_map, sources = pattern
    blocks = _blocks(_fast(layer_map))
    originals = models.make_llama().model.layers
    for i, src in enumerate(sources):
        q = blocks[i].self_attn.q_proj
        torch.testing.assert_close(q.base_layer.weight, originals[src].self_attn.q_proj.weight)
        for j in range(i + 1, len(sources)):
            other = blocks[j]
            same = src == sources[j]
            assert (q.base_layer.weight.data_ptr()
                    == other.self_attn.q_proj.base_layer.weight.data_ptr()) is same
            assert (blocks[i].input_layernorm.weight is other.input_layernorm.weight) is same
            assert q.lora_A["default"].weight is not other.self_attn.q_proj.lora_A["default"].weight
            assert (q.lora_A["default"].weight.data_ptr()
                    != other.self_attn.q_proj.lora_A["default"].weight.data_ptr())


def test_outputs_match_hf_peft(pattern):
    layer_map, _ = pattern
    fast, hf = _fast(layer_map), _hf(layer_map)
    assert set(fast.state_dict()) == set(hf.state_dict())
    _perturb(fast)
    _copy_lora(fast, hf)
    torch.testing.assert_close(_logits(fast), _logits(hf), atol=1e-5, rtol=0)
    with fast.disable_adapter(), hf.disable_adapter():
        torch.testing.assert_close(_logits(fast), _logits(hf), atol=1e-5, rtol=0)


def test_cached_generation_matches_hf_peft():
    # a wrong layer_idx makes copies share a KV-cache slot, which only shows with the cache on
    layer_map, _ = PATTERNS["0-1-1"]
    fast, hf = _fast(layer_map), _hf(layer_map)
    _perturb(fast)
    _copy_lora(fast, hf)
    ids = models.llama_inputs()["input_ids"][:1]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out_fast = fast.generate(input_ids=ids, **kw)
        out_hf = hf.generate(input_ids=ids, **kw)
        full = fast(input_ids=out_fast[:, :-1]).logits[:, -1]
        step = fast(input_ids=out_fast[:, :-1], use_cache=True).logits[:, -1]
    assert torch.equal(out_fast, out_hf)
    torch.testing.assert_close(full, step, atol=1e-5, rtol=0)


def _saved_keys(path):
    return set(load_file(str(path / "adapter_model.safetensors")))


def test_save_load_round_trip_both_ways(tmp_path, pattern):
    layer_map, sources = pattern
    fast, hf = _fast(layer_map), _hf(layer_map)
    _perturb(fast)
    _copy_lora(fast, hf)
    expected = _logits(fast)
    fast.save_pretrained(tmp_path / "fast")
    hf.save_pretrained(tmp_path / "hf")
    assert _saved_keys(tmp_path / "fast") == _saved_keys(tmp_path / "hf")
    loaders = {"fastpeft": fastpeft.PeftModel, "peft": peft.PeftModel}
    for lib, cls in loaders.items():
        for src in ("fast", "hf"):
            loaded = cls.from_pretrained(models.make_llama(), tmp_path / src)
            assert len(loaded.base_model.model.model.layers) == len(sources), (lib, src)
            torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0, msg=f"{lib} <- {src}")


def test_training_step_changes_only_lora():
    model = _fast(PATTERNS["0-1-1"][0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = models.llama_inputs()
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    # lora_B starts at zero, so only B moves on the first step; every copy's B moves on its own
    assert {n for n in changed if "lora_B" in n and "q_proj" in n} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.default.weight" for i in range(3)}


@pytest.mark.parametrize("layer_map, match", [
    ([[0, 3]], r"\[0, 3\] is invalid for a model with 2 layers"),
    ([[2, 3]], r"\[2, 3\] is invalid"),
    ([[-1, 1]], r"\[-1, 1\] is invalid"),
    ([[1, 1]], r"\[1, 1\] is invalid"),
    ([[0, 2], [1]], r"\[start, end\] integer pairs"),
    ([], None),  # empty list means "off", like HF PEFT
])
def test_bad_ranges_are_refused_before_touching_the_model(layer_map, match):
    base = models.make_llama()
    blocks = base.model.layers
    config = _config(fastpeft, layer_map)
    if match is None:
        fastpeft.get_peft_model(base, config)
    else:
        with pytest.raises(ValueError, match=match):
            fastpeft.get_peft_model(base, config)
    assert base.model.layers is blocks and base.config.num_hidden_layers == 2


@pytest.mark.parametrize("entry", ["get_peft_model", "add_adapter"])
def test_a_failure_after_the_stacking_puts_the_original_blocks_back(entry):
    """The blocks are stacked before the targets are looked up; targets that match nothing fail after it, and
    the model must come back with its own block list and layer count (all or nothing)."""
    base = models.make_llama()
    blocks = base.model.layers
    model = fastpeft.get_peft_model(base, _config(fastpeft, None)) if entry == "add_adapter" else None
    bad = _config(fastpeft, [[0, 2], [1, 2]], target_modules=["no_such_module"])
    with pytest.raises(ValueError, match="no_such_module"):
        if model is None:
            fastpeft.get_peft_model(base, bad)
        else:
            model.add_adapter("other", bad)
    assert base.model.layers is blocks and base.config.num_hidden_layers == 2
    assert [m.self_attn.layer_idx for m in base.model.layers] == [0, 1]


def test_replication_is_a_model_step_not_a_config_step():
    """prepare_config only fills the config; the tuner's prepare_model hook stacks the blocks."""
    tuner = _fast(None).base_model
    base, config = models.make_llama(), _config(fastpeft, [[0, 2], [1, 2]])
    tuner.prepare_config(config, base)
    assert len(base.model.layers) == 2
    tuner.prepare_model(base, config)
    assert len(base.model.layers) == 3


def test_unsupported_architecture_names_the_supported_ones():
    config = fastpeft.LoraConfig(target_modules=["lin0"], layer_replication=[[0, 1]])
    with pytest.raises(ValueError, match="Llama-style `layers`.*BERT-style.*Falcon-style"):
        fastpeft.get_peft_model(models.make_mlp(), config)


def test_h_stack_found_on_the_bare_model_only_like_hf():
    # HF PEFT only unwraps `.model` / `.bert`: GPT2LMHeadModel (blocks at .transformer.h) is refused by both
    config = {"target_modules": ["c_attn"], "layer_replication": [[0, 2], [0, 1]]}
    with pytest.raises(ValueError, match="Falcon-style `h`"):
        fastpeft.get_peft_model(models.make_gpt2(), fastpeft.LoraConfig(**config))
    with pytest.raises(ValueError):
        peft.get_peft_model(models.make_gpt2(), peft.LoraConfig(**config))
    bare = models.make_gpt2().transformer
    assert replication.find_layer_list(bare) == (bare, ("h",))
    replication.replicate_layers(bare, config["layer_replication"])
    assert len(bare.h) == 3 and bare.config.num_hidden_layers == 3
    assert bare.h[2].attn.c_attn.weight is bare.h[0].attn.c_attn.weight
    assert bare.h[1].attn.c_attn.weight is not bare.h[0].attn.c_attn.weight


def test_merging_a_replicated_model_is_refused():
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]]))
    with pytest.raises(ValueError, match="layer_replication"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="layer_replication"):
        model.merge_and_unload()
