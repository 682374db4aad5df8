"""Bottleneck adapters (fastpeft's own BOTTLENECK method) against the `adapters` library (AdapterHub).

The oracle is tests/fixtures/bottleneck/: tiny BERT / RoBERTa / XLM-R / ELECTRA weights, AdapterHub folders
saved by `adapters` 1.3 (Houlsby, Pfeiffer, parallel on each; three option mixes on BERT and RoBERTa; non-zero
weights) and that library's outputs, made by
make_fixtures.py in a venv with `adapters` (it needs transformers 4.57). Here the same base weights and the
imported adapters must give the same last hidden states.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import BottleneckConfig, PeftModel, get_peft_model, load_adapterhub_adapter
from fastpeft.core.layer import AdapterHolder

from models import MODELS

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "bottleneck")
REFS = load_file(os.path.join(FIXTURES, "refs.safetensors"))
SIZES = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             attn_implementation="eager")
PRESETS = ("houlsby", "pfeiffer", "parallel")
OPTIONS = ("options_seq", "options_double", "options_par")  # the other BnConfig options, on BERT / RoBERTa
ROWS = [(label, name) for label in ("bert", "roberta") for name in PRESETS + OPTIONS] + [
    (label, name) for label in ("xlmr", "electra") for name in PRESETS]
TOL = 1e-5  # float32 round-off; every adapter moves the outputs by more than 0.5 (checked)
GRAD_TOL = 1e-5  # max difference seen 1e-6; the gradients are larger than 1e-3 (one exception, named below)


def base_model(label: str):
    import transformers as tf

    if label == "bert":
        config = tf.BertConfig(max_position_embeddings=64, num_labels=2, **SIZES)
        model = tf.BertForSequenceClassification(config)
    elif label == "electra":
        model = tf.ElectraModel(tf.ElectraConfig(max_position_embeddings=64, embedding_size=32, **SIZES))
    else:
        config_cls, model_cls = {"roberta": (tf.RobertaConfig, tf.RobertaModel),
                                 "xlmr": (tf.XLMRobertaConfig, tf.XLMRobertaModel)}[label]
        config = config_cls(max_position_embeddings=66, pad_token_id=1, type_vocab_size=1, **SIZES)
        model = model_cls(config, add_pooling_layer=False)
    model.load_state_dict(load_file(os.path.join(FIXTURES, f"{label}_base.safetensors")))
    return model.eval()


def hidden(model, rows=slice(None)) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=REFS["input_ids"][rows], attention_mask=REFS["attention_mask"][rows],
                    output_hidden_states=True)
    return out.hidden_states[-1]


def imported(label: str, name: str, model=None, **kwargs):
    with warnings.catch_warnings():  # the classifier head is not in modules_to_save: not trained here
        warnings.simplefilter("ignore")
        return load_adapterhub_adapter(model if model is not None else base_model(label),
                                       os.path.join(FIXTURES, f"{label}_{name}"), **kwargs)


def snapshot(model) -> tuple[dict, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()])


def assert_unchanged(model, before) -> None:
    state, modules = snapshot(model)
    assert modules == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


# ------------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("label, name", ROWS)
def test_imported_adapterhub_adapter_gives_the_adapters_library_outputs(label, name):
    model = imported(label, name)
    assert isinstance(model, PeftModel) and model.active_adapter == name  # the folder's name
    expected, base = REFS[f"{label}.{name}"], REFS[f"{label}.base"]
    assert (expected - base).abs().max() > 0.5  # the adapter's effect dwarfs the tolerance
    assert torch.allclose(hidden(model), expected, atol=TOL, rtol=0)
    with model.disable_adapter():
        assert torch.allclose(hidden(model), base, atol=TOL, rtol=0)


@pytest.mark.parametrize("label", ["bert", "roberta", "xlmr", "electra"])
def test_several_active_adapters_stack_as_the_adapters_library(label):
    model = imported(label, "houlsby")
    imported(label, "pfeiffer", model=model)
    model.base_model.set_adapter(["houlsby", "pfeiffer"])
    stacked = REFS[f"{label}.stack"]
    assert (stacked - REFS[f"{label}.pfeiffer"]).abs().max() > 0.5
    assert torch.allclose(hidden(model), stacked, atol=TOL, rtol=0)


def test_presets_are_the_adapters_library_configs():
    for preset in ("houlsby", "pfeiffer", "parallel"):
        from_file = BottleneckConfig.from_adapterhub(os.path.join(FIXTURES, f"bert_{preset}"))
        factor = {"houlsby": 4, "pfeiffer": 4, "parallel": 2}[preset]
        ours = getattr(BottleneckConfig, preset)(reduction_factor=factor)
        assert ours.to_dict() == from_file.to_dict(), preset
    assert BottleneckConfig.preset("double_seq_bn").to_dict() == BottleneckConfig.houlsby().to_dict()
    assert BottleneckConfig().to_dict() == BottleneckConfig.pfeiffer().to_dict()  # AdapterHub's default
    # a config naming a preset, and the "config" entry alone
    named = BottleneckConfig.from_adapterhub({"config": "par_bn"})
    assert named.to_dict() == BottleneckConfig.parallel().to_dict()
    inner = json.loads(open(os.path.join(FIXTURES, "bert_houlsby", "adapter_config.json")).read())["config"]
    houlsby = BottleneckConfig.houlsby(reduction_factor=4)
    assert BottleneckConfig.from_adapterhub(inner).to_dict() == houlsby.to_dict()


# ------------------------------------------------------------------------------------------------ training
def test_one_training_step_trains_the_adapter_only():
    model = imported("bert", "houlsby", is_trainable=True)
    model.train()
    out = model(input_ids=REFS["input_ids"], attention_mask=REFS["attention_mask"], output_hidden_states=True)
    # a fixed random readout: the squared norm would be blind to the adapter (LayerNorm normalises it)
    readout = torch.randn(out.hidden_states[-1].shape, generator=torch.Generator().manual_seed(0))
    (out.hidden_states[-1] * readout).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_adapter.houlsby." in n for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    before = hidden(model.eval())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert (hidden(model) - before).abs().max() > 1e-3


def fastpeft_name(hub_key: str, name: str) -> str:
    """The fastpeft parameter of an AdapterHub parameter name (the adapters library also names a ln_before
    LayerNorm adapter_norm_before, the same module as adapter_down.0)."""
    local = hub_key.replace(f".adapters.{name}.", f".bottleneck_adapter.{name}.")
    return "base_model.model." + local.replace("adapter_norm_before.", "adapter_down.0.")


@pytest.mark.parametrize("name", PRESETS + OPTIONS)
def test_gradients_equal_the_adapters_library(name):
    model = imported("bert", name, is_trainable=True)
    model.eval()  # no dropout, as the reference
    out = model(input_ids=REFS["input_ids"], attention_mask=REFS["attention_mask"], output_hidden_states=True)
    (out.hidden_states[-1] * REFS["readout"]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    prefix = f"grad.bert.{name}."
    expected = {fastpeft_name(k[len(prefix):], name): v for k, v in REFS.items() if k.startswith(prefix)}
    assert expected and sorted(grads) == sorted(expected)
    for key, grad in expected.items():
        # a gate followed by the adapter's own LayerNorm (options_par) barely matters: LayerNorm is scale-free
        assert grad.abs().max() > 1e-3 or (name == "options_par" and ".gate." in key), key
        torch.testing.assert_close(grads[key], grad, atol=GRAD_TOL, rtol=0, msg=key)


INITS = {  # make_fixtures.py's INITS, as fastpeft configs
    "init_bert": BottleneckConfig.pfeiffer(reduction_factor=4, ln_before=True, use_gating=True,
                                           scaling="channel"),
    "init_houlsby": BottleneckConfig.houlsby(reduction_factor=4, init_weights="houlsby", ln_after=True,
                                            use_gating=True),
    "init_mam": BottleneckConfig.parallel(reduction_factor=4, use_gating=True),
}


@pytest.mark.parametrize("name", sorted(INITS))
def test_a_seed_draws_the_adapters_library_initial_weights(name):
    base = base_model("bert")
    torch.manual_seed(1234)  # make_fixtures.py's INIT_SEED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, INITS[name], adapter_name=name)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {fastpeft_name(k[len("init."):], name): v for k, v in REFS.items()
                if k.startswith("init.") and f".adapters.{name}." in k}
    assert expected and sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


# ------------------------------------------------------------------------------------------------ files
def test_save_and_load_round_trip_in_fastpeft_format(tmp_path):
    model = imported("bert", "options_seq", adapter_name="default")  # other names save into a sub-folder
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["ln_before"] and saved["scaling"] == "channel"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.bert.encoder.layer.0.output.bottleneck_adapter.adapter_down.1.weight" in keys
    # a fresh adapter of the same config differs from the file's: the load below is not vacuous
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = get_peft_model(base_model("bert"), BottleneckConfig(**{
            k: v for k, v in saved.items() if k in BottleneckConfig.__dataclass_fields__}))
    assert (hidden(fresh.eval()) - REFS["bert.options_seq"]).abs().max() > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(base_model("bert"), tmp_path, strict=True)
    assert torch.allclose(hidden(loaded), REFS["bert.options_seq"], atol=TOL, rtol=0)
    fresh.load_adapter(tmp_path, "default_loaded", strict=True)
    fresh.set_adapter("default_loaded")
    assert torch.allclose(hidden(fresh), REFS["bert.options_seq"], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------ mixed batch
def test_mixed_batch_gives_each_row_its_adapter():
    model = imported("roberta", "houlsby")
    imported("roberta", "parallel", model=model)
    names = ["parallel", "__base__", "houlsby"]
    with torch.no_grad():
        out = model(input_ids=REFS["input_ids"], attention_mask=REFS["attention_mask"], adapter_names=names,
                    output_hidden_states=True).hidden_states[-1]
    for row, name in enumerate(names):
        expected = REFS[f"roberta.{name.strip('_')}"][row]
        assert torch.allclose(out[row], expected, atol=TOL, rtol=0), name


# ------------------------------------------------------------------------------------------------ refusals
def test_merge_is_refused_and_leaves_the_model_as_it_was():
    model = imported("bert", "pfeiffer")
    before = snapshot(model)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*non-linear"):
            call()
        assert_unchanged(model, before)
    layer = next(m for m in model.modules() if isinstance(m, AdapterHolder))
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()
    assert torch.allclose(hidden(model), REFS["bert.pfeiffer"], atol=TOL, rtol=0)
    with pytest.raises(NotImplementedError, match="add_weighted_adapter is not available"):
        model.add_weighted_adapter(["pfeiffer"], [1.0], "weighted")
    assert list(model.peft_config) == ["pfeiffer"]
    plain = model.unload()  # removing the adapter is fine
    assert not any(isinstance(m, AdapterHolder) for m in plain.modules())
    assert torch.allclose(hidden(plain), REFS["bert.base"], atol=TOL, rtol=0)


@pytest.mark.parametrize("folder, error, match", [
    ("refused_compacter", NotImplementedError, "phm_layer=True is not supported"),
    ("refused_lora", NotImplementedError, "'lora' adapter; fastpeft imports bottleneck adapters only"),
    ("roberta_pfeiffer", NotImplementedError, "trained on a 'roberta' model"),
])
def test_unsupported_adapterhub_folders_are_refused_with_the_model_unchanged(folder, error, match):
    model = base_model("bert")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapterhub_adapter(model, os.path.join(FIXTURES, folder))
    assert_unchanged(model, before)
    wrapped = imported("bert", "houlsby")  # into a PeftModel: its adapters stay as they were
    before = snapshot(wrapped)
    with pytest.raises(error, match=match):
        load_adapterhub_adapter(wrapped, os.path.join(FIXTURES, folder), adapter_name="other")
    assert_unchanged(wrapped, before)
    assert list(wrapped.peft_config) == ["houlsby"]


def test_a_taken_adapter_name_is_refused():
    model = imported("bert", "houlsby")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'houlsby'"):
        imported("bert", "houlsby", model=model)
    assert_unchanged(model, before)


def test_an_unsupported_architecture_is_refused_with_the_model_unchanged():
    gpt2 = MODELS["gpt2"][0]()
    before = snapshot(gpt2)
    with pytest.raises(NotImplementedError, match="not available for model_type 'gpt2'.*'bert', 'roberta'"):
        load_adapterhub_adapter(gpt2, os.path.join(FIXTURES, "refused_gpt2"))
    assert_unchanged(gpt2, before)
    with pytest.raises(NotImplementedError, match="not available for model_type 'gpt2'"):
        get_peft_model(gpt2, BottleneckConfig())
    assert_unchanged(gpt2, before)


def test_unknown_or_unimplemented_options_are_refused(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(os.path.join(FIXTURES, "bert_pfeiffer"), folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"]["some_future_option"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(data))
    model = base_model("bert")
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match=r"options \['some_future_option'\] are not supported"):
        load_adapterhub_adapter(model, folder)
    assert_unchanged(model, before)
    for option, value in (("inv_adapter", "nice"), ("cross_adapter", True), ("stochastic_depth", 0.1),
                          ("phm_layer", True)):
        with pytest.raises(NotImplementedError, match=f"{option}=.* is not supported"):
            BottleneckConfig(**{option: value})
    with pytest.raises(ValueError, match="adds no adapter"):
        BottleneckConfig(output_adapter=False)
    with pytest.raises(ValueError, match="'post_add'.*original_ln_before"):
        BottleneckConfig.houlsby(residual_before_ln="post_add")
    with pytest.raises(ValueError, match="no 'default' entry"):
        get_peft_model(base_model("roberta"), BottleneckConfig(reduction_factor={"0": 4}))


def test_adapter_fusion_is_refused(tmp_path):
    folder = tmp_path / "fusion"
    shutil.copytree(os.path.join(FIXTURES, "bert_houlsby"), folder)
    (folder / "adapter_fusion_config.json").write_text(json.dumps({"config": {"key": True}}))
    model = base_model("bert")
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="AdapterFusion layer.*not supported"):
        load_adapterhub_adapter(model, folder)
    assert_unchanged(model, before)


def test_weights_of_another_layout_are_refused(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(os.path.join(FIXTURES, "roberta_houlsby"), folder)
    weights = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    weights["encoder.layer.0.intermediate.adapters.houlsby.adapter_up.weight"] = torch.zeros(2)
    torch.save(weights, folder / "pytorch_adapter.bin")
    model = base_model("roberta")
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="intermediate.adapters.houlsby.*not imported"):
        load_adapterhub_adapter(model, folder)
    assert_unchanged(model, before)


def test_layers_left_out_and_per_layer_factors():
    model = get_peft_model(base_model("roberta"), BottleneckConfig.houlsby(
        leave_out=[0], reduction_factor={1: 2, "default": 16}))
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdapterHolder)}
    assert adapted == {"base_model.model.encoder.layer.1.attention.output",
                       "base_model.model.encoder.layer.1.output"}
    down = model.base_model.model.encoder.layer[1].output.bottleneck_adapter["default"].adapter_down[0]
    assert down.out_features == 16  # hidden 32 / factor 2
    assert fastpeft.PeftType("BOTTLENECK") is fastpeft.PeftType.BOTTLENECK
