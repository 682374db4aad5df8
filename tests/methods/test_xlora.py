"""X-LoRA against HF PEFT 0.21.2: the same experts (one saved by each library, different ranks and targets)
and the same seeds give the same classifier, logits, scalings, top-k, training-step gradients and greedy
tokens; files both ways; bad experts / configs refused with the model left as it was.

HF PEFT 0.21.2 saves no complete classifier (its save drops every tensor whose name contains an expert's
name, e.g. `layers.0.weight` next to expert "0"), so HF -> fastpeft is checked on what HF writes: a depth-3
classifier's `layers.3` / `layers.6` tensors, the rest at the seeded init in both libraries.
"""

from __future__ import annotations

import json
import logging
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.errors import AdapterLoadError
from fastpeft.methods.lora.layer import LoraLayer

from models import llama_inputs, make_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

HIDDEN = 32
CLASSIFIER_KEYS = {"base_model.internal_xlora_classifier.layers.0.weight",
                   "base_model.internal_xlora_classifier.layers.0.bias"}


def base():
    model = make_llama()
    model.config.use_cache = False  # X-LoRA re-runs the whole sequence (both libraries require it)
    return model


def _save_expert(lib, path, seed, **lora):
    torch.manual_seed(seed)
    model = lib.get_peft_model(make_llama(), lib.LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Expert "0": r=4 on q/v (saved by fastpeft); expert "1": r=8 on q/v/embed_tokens (saved by HF PEFT)."""
    root = tmp_path_factory.mktemp("xlora_experts")
    return {"0": _save_expert(fastpeft, root / "e0", 10, r=4, target_modules=["q_proj", "v_proj"]),
            "1": _save_expert(peft, root / "e1", 11, r=8, lora_alpha=4,
                              target_modules=["q_proj", "v_proj", "embed_tokens"])}


@pytest.fixture(scope="module")
def bad_experts(tmp_path_factory):
    """Experts X-LoRA refuses: DoRA, an IA3 adapter, a LoRA made for a wider model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("xlora_bad")
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(3)
    lora = fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    fastpeft.get_peft_model(wide, lora).save_pretrained(root / "wide")
    ia3 = fastpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    fastpeft.get_peft_model(make_llama(), ia3).save_pretrained(root / "ia3")
    return {"dora": _save_expert(fastpeft, root / "dora", 4, r=4, target_modules=["q_proj"], use_dora=True),
            "ia3": str(root / "ia3"), "wide": str(root / "wide"), "missing": str(root / "nowhere")}


def build(lib, adapters, seed=0, **options):
    model = base()  # seeds torch itself (models.py): the classifier's seed comes after it
    torch.manual_seed(seed)
    config = lib.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=adapters, **options)
    return lib.get_peft_model(model, config)


def load(lib, path, seed, **kwargs):
    model = base()
    torch.manual_seed(seed)
    return lib.PeftModel.from_pretrained(model, str(path), **kwargs)


def pair(adapters, seed=0, **options):
    return build(peft, adapters, seed, **options), build(fastpeft, adapters, seed, **options)


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or llama_inputs())).logits


CONFIGS = {
    "default": {},
    "layerwise_depth2": dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16, softmax_temperature=0.5),
    "topk_softmax_topk": dict(top_k_lora=1, enable_softmax=False, enable_softmax_topk=True),
    "depth3_no_softmax": dict(xlora_depth=3, xlora_size=8, enable_softmax=False),
}


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_and_scalings_match_hf(experts, options):
    hf, fp = pair(experts, **options)
    hf_params, fp_params = dict(hf.named_parameters()), dict(fp.named_parameters())
    # same layout: base_model.lora_model.model.* / base_model.internal_xlora_classifier.*
    assert hf_params.keys() == fp_params.keys()
    assert all(torch.equal(hf_params[k], fp_params[k]) for k in hf_params)  # same seeded classifier
    ours = logits(fp)
    assert (logits(hf) - ours).abs().max() < 1e-6
    assert torch.allclose(hf.get_latest_scalings(), fp.get_latest_scalings(), atol=1e-7)
    assert fp.get_latest_scalings().shape == (2, 6, 5, 2)  # (batch, seq, LoRA layers, experts)
    with fp.disable_adapter():
        assert (logits(fp) - ours).abs().max() > 0.05  # the experts' effect is far above the tolerance
        assert torch.equal(logits(fp), logits(base()))
    assert fp.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()


def test_setters_match_hf(experts):
    hf, fp = pair(experts)
    dense = logits(fp)
    for model in (hf, fp):
        model.set_scaling_pass_value(None)  # 1 / n_experts in the scaling pass
        model.set_global_scaling_weight(0.5)
    assert fp.get_global_scaling_weight() == 0.5 and fp.peft_config["default"].scaling_pass_value == 0.5
    ours = logits(fp)
    assert (logits(hf) - ours).abs().max() < 1e-6 and (ours - dense).abs().max() > 0.02
    for model in (hf, fp):
        model.set_topk_lora(1)
    top1 = logits(fp)
    assert (logits(hf) - top1).abs().max() < 1e-6 and (top1 - ours).abs().max() > 0.01
    fp.set_topk_lora(None)
    assert torch.equal(logits(fp), ours)
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        fp.set_topk_lora(3)


@pytest.mark.parametrize("trainable_experts", [False, True], ids=["classifier", "classifier_and_experts"])
def test_training_step_gradients_match_hf(experts, trainable_experts):
    # scaling_pass_value 0.5: the experts act in the scaling pass too, which must give them no gradient
    hf, fp = pair(experts, use_trainable_adapters=trainable_experts, scaling_pass_value=0.5)
    inputs = llama_inputs()
    grads = []
    for model in (hf, fp):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    hf_grads, fp_grads = grads
    assert hf_grads.keys() == fp_grads.keys()
    assert any(".lora_A." in k for k in fp_grads) is trainable_experts
    for key, grad in hf_grads.items():
        assert grad.abs().max() > 0, key
        assert torch.allclose(grad, fp_grads[key], atol=1e-7), key


def test_fastpeft_files_load_in_hf(experts, tmp_path):
    fp = build(fastpeft, experts, seed=0)
    expected = logits(fp)
    fp.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == CLASSIFIER_KEYS
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["adapters"] == experts
    assert config["hidden_size"] == HIDDEN
    other_init = build(fastpeft, experts, seed=99)  # what a load with seed 99 starts from
    assert (logits(other_init) - expected).abs().max() > 1e-3
    hf = load(peft, tmp_path, 99)
    assert (logits(hf) - expected).abs().max() < 1e-6
    ours = load(fastpeft, tmp_path, 99)
    assert (logits(ours) - expected).abs().max() < 1e-6
    # loaded frozen (HF PEFT leaves the classifier trainable)
    assert ours.get_nb_trainable_parameters()[0] == 0
    trainable = load(fastpeft, tmp_path, 99, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 66  # 2 x 32 weights + 2 biases
    lean = load(fastpeft, tmp_path, 99, low_cpu_mem_usage=True)  # experts built on meta, filled from files
    assert not any(p.is_meta for p in lean.parameters())
    assert (logits(lean) - expected).abs().max() < 1e-6


def test_hf_files_load_in_fastpeft(experts, tmp_path, caplog):
    hf = build(peft, experts, seed=0, xlora_depth=3, xlora_size=8, xlora_dropout_p=0.1)
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.split("layers.")[1] for k in saved} == {"3.weight", "3.bias", "6.weight", "6.bias"}
    hf_loaded = load(peft, tmp_path, 5)  # another init than the saved model's
    with caplog.at_level(logging.WARNING):
        ours = load(fastpeft, tmp_path, 5)
    assert "layers.0.weight" in caplog.text  # what HF PEFT did not save is reported
    layers = ours.base_model.internal_xlora_classifier.layers
    source = hf.base_model.internal_xlora_classifier.layers
    assert torch.equal(layers[3].weight, source[3].weight) and torch.equal(layers[6].bias, source[6].bias)
    assert not torch.equal(layers[0].weight, source[0].weight)  # not in the file: seeded init, as HF PEFT
    assert (logits(hf_loaded) - logits(ours)).abs().max() < 1e-6


def test_bf16_base_keeps_the_expert_files_values(experts):
    """Experts on a bf16 base are fp32 (autocast_adapter_dtype) holding the files' exact values; HF PEFT
    0.21.2 loads them into bf16 weights first and widens after, so its experts are the files' values rounded
    to bf16 (its logits differ from ours by about one bf16 step)."""
    model = make_llama().to(torch.bfloat16)
    model.config.use_cache = False
    config = fastpeft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=experts)
    fp = fastpeft.get_peft_model(model, config)
    out = logits(fp)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    saved = load_file(os.path.join(experts["1"], "adapter_model.safetensors"))
    layer = fp.base_model.lora_model.model.model.embed_tokens
    table = layer.lora_embedding_B["1"]
    assert table.dtype == torch.float32
    assert torch.equal(table, saved["base_model.model.model.embed_tokens.lora_embedding_B"])
    with fp.disable_adapter():
        assert (logits(fp).float() - out.float()).abs().max() > 0.05


def test_bf16_base_matches_hf_on_bf16_exact_experts(experts, tmp_path):
    """With expert values that bf16 holds exactly, HF PEFT's rounding on load is lossless: same logits."""
    import shutil

    exact = {}
    for name, path in experts.items():
        shutil.copytree(path, tmp_path / name)
        weights = load_file(tmp_path / name / "adapter_model.safetensors")
        save_file({k: v.bfloat16().float() for k, v in weights.items()},
                  os.fspath(tmp_path / name / "adapter_model.safetensors"))
        exact[name] = str(tmp_path / name)
    outs = []
    for lib in (peft, fastpeft):
        model = make_llama().to(torch.bfloat16)
        model.config.use_cache = False
        torch.manual_seed(0)
        config = lib.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=exact)
        outs.append(logits(lib.get_peft_model(model, config)))
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])


def _greedy(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_generate_matches_hf_and_a_greedy_loop(experts):
    hf, fp = pair(experts)
    ids = llama_inputs()["input_ids"][:1, :4]
    ours = fp.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, hf.generate(input_ids=ids, max_new_tokens=5, do_sample=False))
    # as HF PEFT: no KV cache whatever the caller asks (each step re-runs both passes over the sequence)
    lengths = []
    handle = fp.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    assert torch.equal(ours, fp.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True))
    handle.remove()
    assert lengths == [4, 4, 5, 5, 6, 6, 7, 7, 8, 8]  # scaling pass + real pass per step, whole sequence
    assert torch.equal(ours, _greedy(fp, ids, 5))
    with fp.disable_adapter():
        assert not torch.equal(_greedy(fp, ids, 5), ours)  # the experts change the tokens


def test_scalings_log(experts):
    fp = build(fastpeft, experts)
    assert fp.get_latest_scalings() is None
    fp.enable_scalings_logging()
    inputs = llama_inputs()
    logits(fp)
    logits(fp, {k: v[:, :4] for k, v in inputs.items()})
    log = fp.get_scalings_log()
    assert [s.shape[1] for s in log] == [6, 4] and log[1] is fp.get_latest_scalings()
    buckets = fp.get_bucketed_scalings_log()
    assert sorted(buckets) == [4, 6] and buckets[4][0] == [1] and buckets[6][1][0] is log[0]
    fp.disable_scalings_logging()
    logits(fp)
    assert len(fp.get_scalings_log()) == 2
    log.clear()  # a copy: the model's log stays
    assert len(fp.get_scalings_log()) == 2
    fp.clear_scalings_log()
    assert fp.get_scalings_log() == []


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, "peft_config" in model.__dict__)


def _assert_unchanged(model, before):
    types, state, grads, had_config = _snapshot(model)
    assert types == before[0] and grads == before[2] and had_config == before[3]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)
    assert not any(isinstance(m, LoraLayer) or "forward" in m.__dict__ for m in model.modules())


BAD = {
    "dora": (lambda e, b: {"0": e["0"], "1": b["dora"]}, {}, NotImplementedError, "use_dora"),
    "ia3": (lambda e, b: {"0": e["0"], "1": b["ia3"]}, {}, ValueError, "X-LoRA mixes LoRA adapters only"),
    "wide_second": (lambda e, b: {"0": e["0"], "1": b["wide"]}, {}, Exception, "shape"),
    "missing": (lambda e, b: {"0": b["missing"]}, {}, AdapterLoadError, "does not exist"),
    "empty": (lambda e, b: {}, {}, ValueError, "adapters is empty"),
    "hidden_size": (lambda e, b: e, {"hidden_size": 16}, ValueError, "hidden_size=32"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_experts_and_configs_are_refused_leaving_the_model_unchanged(experts, bad_experts, case):
    adapters, options, error, message = case
    model = base()
    before = _snapshot(model)
    config = fastpeft.XLoraConfig(task_type="CAUSAL_LM", **{"hidden_size": HIDDEN, **options},
                                  adapters=adapters(experts, bad_experts))
    with pytest.raises(error, match=message):
        fastpeft.get_peft_model(model, config)
    _assert_unchanged(model, before)


def test_use_cache_and_config_values_are_refused(experts):
    model = make_llama()
    model.config.use_cache = True
    with pytest.raises(ValueError, match="use_cache = False"):
        fastpeft.get_peft_model(model, fastpeft.XLoraConfig(hidden_size=HIDDEN, adapters=experts))
    with pytest.raises(ValueError, match="top_k_lora must be at least 1"):
        fastpeft.XLoraConfig(hidden_size=HIDDEN, adapters=experts, top_k_lora=0)
    with pytest.raises(ValueError, match="xlora_depth must be at least 1"):
        fastpeft.XLoraConfig(hidden_size=HIDDEN, adapters=experts, xlora_depth=0)


def test_a_failed_load_leaves_the_model_unchanged(experts, tmp_path):
    build(fastpeft, experts).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.internal_xlora_classifier.layers.0.weight"] = torch.zeros(3, HIDDEN)
    save_file(tensors, os.fspath(tmp_path / "adapter_model.safetensors"))
    model = base()
    before = _snapshot(model)
    with pytest.raises(Exception, match="shape"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    _assert_unchanged(model, before)


def test_refusals_and_unload(experts):
    fp = build(fastpeft, experts)
    inputs = llama_inputs()
    with pytest.raises(ValueError, match="one X-LoRA adapter"):
        fp.add_adapter("other", fastpeft.XLoraConfig(hidden_size=HIDDEN, adapters=experts))
    assert list(fp.peft_config) == ["default"]
    with pytest.raises(ValueError, match="no adapter_names"):
        fp(**inputs, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="has one adapter"):
        fp.set_adapter("0")
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        fp.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be deleted"):
        fp.delete_adapter("default")
    unloaded = fp.unload()
    assert not any(isinstance(m, LoraLayer) for m in unloaded.modules())
    assert torch.equal(unloaded(**inputs).logits, logits(base()))


def test_trained_experts_are_saved_with_the_classifier(experts, tmp_path):
    """use_trainable_adapters: the experts train, so the file holds them too (HF PEFT's parameter names, which
    its loader reads back as they are); a reload starts from the expert folders and takes the file's."""
    fp = build(fastpeft, experts, use_trainable_adapters=True)
    with torch.no_grad():  # stands for training: experts unlike their folders
        for name, param in fp.named_parameters():
            if param.requires_grad and "internal_xlora_classifier" not in name:  # the experts' factors
                param.add_(0.05 * torch.randn_like(param))
    expected = logits(fp)
    fp.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert CLASSIFIER_KEYS < set(saved)
    assert "base_model.lora_model.model.model.layers.0.self_attn.q_proj.lora_A.0.weight" in saved
    assert "base_model.lora_model.model.model.embed_tokens.lora_embedding_B.1" in saved
    fresh = build(fastpeft, experts, seed=7, use_trainable_adapters=True)
    assert (logits(fresh) - expected).abs().max() > 0.01
    for lib in (peft, fastpeft):
        assert (logits(load(lib, tmp_path, 7)) - expected).abs().max() < 1e-6, lib.__name__


def test_from_pretrained_takes_moved_expert_folders(experts, tmp_path):
    """The saved config names the expert folders; `adapters=` at load replaces them (HF PEFT's documented
    keyword; its from_pretrained keeps the file's paths)."""
    fp = build(fastpeft, experts)
    expected = logits(fp)
    fp.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["adapters"] = {name: str(tmp_path / "gone" / name) for name in experts}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = base()
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    _assert_unchanged(model, before)
    loaded = fastpeft.PeftModel.from_pretrained(model, str(tmp_path), adapters=experts)
    assert loaded.peft_config["default"].adapters == experts
    assert (logits(loaded) - expected).abs().max() < 1e-6


def test_inject_adapter_in_model_refused_leaving_the_model_unchanged(experts):
    """The classifier lives on XLoraModel, not in the model: a bare injection would lose it (HF PEFT returns
    the model without it), so fastpeft points to get_peft_model."""
    model = base()
    before = _snapshot(model)
    config = fastpeft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=experts)
    with pytest.raises(ValueError, match="inject_adapter_in_model does not support XLORA.*get_peft_model"):
        fastpeft.inject_adapter_in_model(config, model)
    _assert_unchanged(model, before)


def test_set_requires_grad_as_hf(experts):
    """X-LoRA's tuner has no set_requires_grad of its own: PeftModel sets its holders' flags directly, where
    HF PEFT runs its BaseTuner method (it leaves the classifier as it is for "default"); not refused as
    for prompt learning."""
    theirs, ours = pair(experts)
    for requires_grad in (False, True):
        for model in (ours, theirs):
            model.set_requires_grad("default", requires_grad)
        trained = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (ours, theirs)]
        assert trained[0] == trained[1] and trained[0]
