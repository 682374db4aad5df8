"""Several adapters on one base: mixed batches (forward and generate) and several active adapters, vs HF
PEFT."""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft

from models import MODELS, forward

CASES = {  # model -> (LoRA targets: linear, embedding and conv layers, name of the forward's input)
    "mlp": (["lin0", "lin1"], "x"),
    "emb": (["emb", "lin"], "input_ids"),
    "conv2d": (["conv0", "conv1"], "x"),
    "llama": (["q_proj", "v_proj", "embed_tokens"], "input_ids"),
}


def _two_adapters(lib, model_name, modules_to_save=None):
    factory = MODELS[model_name][0]
    config = dict(r=4, target_modules=CASES[model_name][0], init_lora_weights=False,
                  modules_to_save=modules_to_save)
    model = lib.get_peft_model(factory(), lib.LoraConfig(**config))
    model.add_adapter("b", lib.LoraConfig(**{**config, "r": 2}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name or ".modules_to_save." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def _batch(model_name, size=3) -> torch.Tensor:
    inputs = MODELS[model_name][1]()
    tensor = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    return tensor.repeat(2, *([1] * (tensor.dim() - 1)))[:size]


@pytest.mark.parametrize("model_name", CASES)
def test_mixed_batch_equals_each_sample_alone_and_hf(model_name):
    ours, theirs = _two_adapters(fastpeft, model_name), _two_adapters(peft, model_name)
    key = CASES[model_name][1]
    names = ["default", "b", "__base__"]
    kwargs = {key: _batch(model_name), "adapter_names": names}
    mixed = forward(ours, kwargs)
    torch.testing.assert_close(mixed, forward(theirs, kwargs), atol=1e-5, rtol=0)
    for i, name in enumerate(names):
        single = {key: kwargs[key][i:i + 1]}
        if name == "__base__":
            with ours.disable_adapter():
                alone = forward(ours, single)
        else:
            ours.set_adapter(name)
            alone = forward(ours, single)
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)
    ours.set_adapter("default")


def test_mixed_batch_with_modules_to_save_matches_hf():
    ours = _two_adapters(fastpeft, "mlp", modules_to_save=["head"])
    theirs = _two_adapters(peft, "mlp", modules_to_save=["head"])
    x = _batch("mlp")
    names = ["b", "__base__", "default"]
    torch.testing.assert_close(forward(ours, {"x": x, "adapter_names": names}),
                               forward(theirs, {"x": x, "adapter_names": names}), atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}],
                         ids=["greedy", "beams", "beams-2-sequences"])
def test_mixed_batch_generate_equals_each_sample_alone(extra):
    model = _two_adapters(fastpeft, "llama")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    names = ["default", "b", "__base__"]
    args = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, **extra)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **args)
    alone = []
    for i, name in enumerate(names):
        one = dict(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **args)
        if name == "__base__":
            with model.disable_adapter():
                alone.append(model.generate(**one))
        else:
            model.set_adapter(name)
            alone.append(model.generate(**one))
    assert torch.equal(out, torch.cat(alone))


def test_unknown_adapter_name_in_mixed_batch_is_refused():
    model = _two_adapters(fastpeft, "mlp")
    with pytest.raises(ValueError, match="unknown adapters"):
        forward(model, {"x": _batch("mlp"), "adapter_names": ["default", "nope", "b"]})


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
def test_several_active_adapters_add_up_like_hf(model_name):
    ours, theirs = _two_adapters(fastpeft, model_name), _two_adapters(peft, model_name)
    ours.base_model.set_adapter(["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    inputs = MODELS[model_name][1]()
    both = forward(ours, inputs)
    torch.testing.assert_close(both, forward(theirs, inputs), atol=1e-5, rtol=0)
    for name in ("default", "b"):
        ours.base_model.set_adapter(name)
        assert not torch.allclose(forward(ours, inputs), both, atol=1e-4), f"{name} alone equals both active"


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}],
                         ids=["greedy", "beams", "beams-2-sequences"])
def test_mixed_batch_generate_seq2seq_matches_hf(extra):
    """An encoder-decoder's encoder sees one row per input while the decoder sees one per beam: each part gets
    adapter names for its own rows (HF PEFT does the same)."""
    def build(lib):
        config = dict(r=4, task_type="SEQ_2_SEQ_LM", init_lora_weights=False)
        model = lib.get_peft_model(MODELS["t5"][0](), lib.LoraConfig(**config))
        model.add_adapter("b", lib.LoraConfig(**config))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if ".lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        return model.eval()

    inputs = MODELS["t5"][1]()
    ids, mask = inputs["input_ids"][:2].repeat(2, 1)[:3], inputs["attention_mask"][:2].repeat(2, 1)[:3]
    args = dict(input_ids=ids, attention_mask=mask, adapter_names=["default", "b", "__base__"],
                max_new_tokens=4, do_sample=False, **extra)
    ours = build(fastpeft).generate(**args)
    assert torch.equal(ours, build(peft).generate(**args))
    assert len({tuple(row.tolist()) for row in ours}) > 1  # the adapters make a difference
