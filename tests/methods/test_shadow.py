"""ShadowPEFT against HF PEFT on a tiny Llama causal LM and a tiny Llama sequence classifier: init, outputs
and the auxiliary loss, gradients, files both ways, generate with the paired cache (vs greedy decoding by full
forwards), the detached shadow model, several adapters, and the refusals."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.shadow import ShadowCache, ShadowConfig, ShadowLayer
from shadow_helpers import (
    BASES,
    CASES,
    INPUTS,
    TOL,
    build,
    close,
    labels_for,
    make_llama_cls,
    run,
    unchanged_after,
)

import models
import oracle_helpers as oh
from greedy_reference import greedy_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- init, outputs
@pytest.mark.parametrize("case", list(CASES))
def test_init_like_hf_and_identity(case):
    """The same seed gives both libraries the same shadow network and layers (same keys); W_up = 0 makes
    the adapted model start equal to the base model."""
    ours, theirs = build(fastpeft, case, perturbed=False), build(peft, case, perturbed=False)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours),
                              peft.get_peft_model_state_dict(theirs))
    base = BASES[CASES[case][0]]()
    close(models.forward(ours, INPUTS), models.forward(base, INPUTS), "identity at init")
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert any(".shadow_backbone.default." in n for n in trainable)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_auxiliary_loss_like_hf(case):
    ours, theirs = build(fastpeft, case), build(peft, case)
    got, expected = run(ours, case), run(theirs, case)
    close(got.logits, expected.logits, "logits")
    close(got.loss, expected.loss, "loss (task + weighted auxiliary)")
    close(got.shadow_loss, expected.shadow_loss, "shadow_loss")
    close(ours.base_model.last_shadow_loss, got.shadow_loss, "last_shadow_loss")
    with torch.no_grad():  # the tuner's own forward adds it too, as HF PEFT's
        close(ours.base_model(**INPUTS, labels=labels_for(CASES[case][0])).loss, got.loss, "tuner forward")
    base_out = run(BASES[CASES[case][0]](), case)
    assert (got.logits - base_out.logits).abs().max() > 100 * TOL  # the adapter changes the outputs
    weight = ours.peft_config["default"].auxiliary_loss_weight
    close(got.loss, base_loss_of(ours, case) + weight * got.shadow_loss, "loss = task + weight * shadow")


@pytest.mark.parametrize("case", ["default", "own_embeddings"])
def test_inputs_embeds_like_hf(case):
    """Called with inputs_embeds only, the shadow backbone is fed them too."""
    outs = []
    for lib in (fastpeft, peft):
        model = build(lib, case)
        embeds = model.get_base_model().get_input_embeddings()(INPUTS["input_ids"])
        with torch.no_grad():
            outs.append(model(inputs_embeds=embeds, attention_mask=INPUTS["attention_mask"],
                              labels=INPUTS["input_ids"]))
    close(outs[0].logits, outs[1].logits, "logits")
    close(outs[0].shadow_loss, outs[1].shadow_loss, "shadow_loss")


def base_loss_of(model, case: str) -> torch.Tensor:
    """The task loss alone: auxiliary_loss_weight 0 keeps the shadow term out (still reported)."""
    config = model.peft_config["default"]
    weight, config.auxiliary_loss_weight = config.auxiliary_loss_weight, 0.0
    try:
        return run(model, case).loss
    finally:
        config.auxiliary_loss_weight = weight


@pytest.mark.parametrize("case", ["default", "narrow_shadow", "cls"])
def test_training_step_gradients_like_hf(case):
    """Gradients of the full loss (task + auxiliary) for every trainable tensor: layers, backbone, head."""
    grads = []
    for lib in (fastpeft, peft):
        model = build(lib, case)
        model.train()
        model(**INPUTS, labels=labels_for(CASES[case][0])).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    ours, theirs = grads
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        # the last block's update MLPs get none in both: the state they make is not used afterwards
        assert (ours[name] is None) == (theirs[name] is None), name
        if theirs[name] is not None:
            close(ours[name], theirs[name], name)
    assert any(g.abs().max() > 0 for n, g in ours.items() if ".shadow_backbone." in n)
    assert all(g.abs().max() > 0 for n, g in ours.items() if n.endswith("shadow_down.default.weight"))


def test_dropout_draws_like_hf():
    """Training mode with shadow_dropout: the same seed gives both libraries the same masks."""
    outs = []
    for lib in (fastpeft, peft):
        model = build(lib, "default", shadow_dropout=0.5).train()
        torch.manual_seed(7)
        outs.append(model(**INPUTS).logits)
    close(outs[0], outs[1], "dropout")
    model = build(fastpeft, "default", shadow_dropout=0.5).train()
    torch.manual_seed(7)
    drawn = model(**INPUTS).logits
    assert (drawn - run(model.eval(), "default", labels=False).logits).abs().max() > 100 * TOL


def make_qwen3():
    """Per-layer config lists (layer_types, max_window_layers) that the one-layer mirror must cut down."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=4,
                      use_sliding_window=True, max_window_layers=3, attn_implementation="eager")
    torch.manual_seed(models.SEED)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize(("make", "inputs", "options"), [
    (make_qwen3, INPUTS, dict(shadow_num_hidden_layers=2)),
    (models.make_gpt2, models.gpt2_inputs(), {}),  # blocks in transformer.h
], ids=["qwen3", "gpt2"])
def test_other_decoders_like_hf(make, inputs, options):
    outs, layer_types = [], []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        config = lib.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0, **options)
        model = lib.get_peft_model(make(), config)
        layer_types.append(getattr(model.base_model.shadow_backbone["default"].config, "layer_types", None))
        models.perturb(model, seed=1, scale=0.3)
        with torch.no_grad():
            outs.append(model.eval()(**inputs, labels=inputs["input_ids"]))
    assert layer_types[0] == layer_types[1]  # qwen3: cut to the mirror's depth
    close(outs[0].logits, outs[1].logits, "logits")
    close(outs[0].shadow_loss, outs[1].shadow_loss, "shadow_loss")


def test_bf16_base_like_hf():
    """The shadow backbone takes the base dtype; the layers' tensors stay float32 (built in that dtype, never
    rounded through bf16), as in HF PEFT."""
    outs, built = [], []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(models.make_llama().to(torch.bfloat16),
                                   lib.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0))
        built.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        models.perturb(model, seed=1, scale=0.3)
        with torch.no_grad():
            outs.append(model.eval()(**INPUTS, labels=INPUTS["input_ids"]))
    ours, theirs = built
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert {t.dtype for n, t in ours.items() if ".shadow_backbone." in n} == {torch.bfloat16}
    assert {t.dtype for n, t in ours.items() if ".shadow_down." in n} == {torch.float32}
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].loss, outs[1].loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = models.make_llama()
        if checkpointing:
            base.gradient_checkpointing_enable()
        model = fastpeft.get_peft_model(base, ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0))
        models.perturb(model, seed=1, scale=0.3)
        model.train()(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1])
    for name, grad in grads[0].items():
        close(grads[1][name], grad, name)


def _save_small_backbone(folder) -> None:
    """A tiny pretrained LlamaModel of the base width, as a shadow_model checkpoint: it keeps its own
    embedding table (the base one feeds only mirrored backbones)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(21)
    LlamaModel(cfg).save_pretrained(str(folder))


def _save_projected_checkpoint(folder) -> None:
    """A projected shadow checkpoint: backbone config and weights plus a trained 16 -> 32 projection."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(22)
    weights = {f"shadow_model.{k}": v.contiguous() for k, v in LlamaModel(cfg).state_dict().items()}
    weights["shadow_hidden_projection.weight"] = torch.randn(32, 16)
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    inner = {**cfg.to_dict(), "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps({"model_type": "causal_lm_with_hidden_projection",
                                                    "shadow_model_config": inner}))


@pytest.mark.parametrize("kind", ["automodel", "projected"])
def test_pretrained_shadow_model_like_hf(kind, tmp_path):
    """shadow_model as a folder: the backbone (and, for a projected checkpoint, the projection) comes from it,
    its embedding table stays frozen; outputs, trainable tensors and files as HF PEFT."""
    folder = tmp_path / "shadow"
    (_save_small_backbone if kind == "automodel" else _save_projected_checkpoint)(folder)
    pair = []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        config = lib.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0, shadow_model=str(folder))
        model = lib.get_peft_model(models.make_llama(), config)
        models.perturb(model, seed=1, scale=0.3)
        pair.append(model.eval())
    ours, theirs = pair
    assert _trainable(ours) == _trainable(theirs)
    assert not ours.base_model.shadow_backbone["default"].embed_tokens.weight.requires_grad
    close(run(ours, "default").loss, run(theirs, "default").loss, "loss")
    close(run(ours, "default").shadow_loss, run(theirs, "default").shadow_loss, "shadow_loss")
    oh.assert_files_both_ways(theirs, models.make_llama, INPUTS, tmp_path / "files", close)


def test_projection_of_the_wrong_size_is_refused(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "shadow"
    _save_projected_checkpoint(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["shadow_hidden_projection.weight"] = torch.zeros(48, 16)  # the base width is 32
    save_file(weights, str(folder / "model.safetensors"))
    model = models.make_llama()
    config = ShadowConfig(task_type="CAUSAL_LM", shadow_model=str(folder))
    unchanged_after(lambda: fastpeft.get_peft_model(model, config), model, "maps 16 -> 48")


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("case", ["default", "narrow_shadow", "cls"])
def test_files_both_ways(case, tmp_path):
    """HF file -> fastpeft (same outputs) -> fastpeft file (same keys, values, config) -> HF (same outputs).
    The loads are not vacuous: a fresh adapter's shadow network differs from the file's."""
    theirs = build(peft, case)
    oh.assert_files_both_ways(theirs, BASES[CASES[case][0]], INPUTS, tmp_path, close)
    frozen = fastpeft.PeftModel.from_pretrained(BASES[CASES[case][0]](), str(tmp_path / "hf"))
    trainable = fastpeft.PeftModel.from_pretrained(BASES[CASES[case][0]](), str(tmp_path / "hf"),
                                                   is_trainable=True)
    assert not _trainable(frozen) and _trainable(trainable) == _trainable(theirs)
    fresh = build(fastpeft, case, seed=5)
    assert (models.forward(fresh, INPUTS) - models.forward(theirs, INPUTS)).abs().max() > 100 * TOL


def test_file_keys_keep_default_for_any_adapter_name(tmp_path):
    """HF PEFT's format: the adapter's part of every shadow key is 'default', whatever the adapter's name."""
    ours = build(fastpeft, "cls")
    ours.save_pretrained(str(tmp_path / "a"))
    keys = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.shadow_down.default.weight" in keys
    assert "base_model.shadow_head.default.weight" in keys
    assert "base_model.shadow_backbone.default.layers.0.self_attn.q_proj.weight" in keys
    assert "base_model.model.score.weight" in keys
    named = fastpeft.PeftModel.from_pretrained(make_llama_cls(), str(tmp_path / "a"), adapter_name="other")
    close(models.forward(named, INPUTS), models.forward(ours, INPUTS), "loaded as 'other'")
    named.save_pretrained(str(tmp_path / "b"), selected_adapters=["other"])
    assert sorted(load_file(str(tmp_path / "b" / "other" / "adapter_model.safetensors"))) == keys


def test_load_into_existing_adapter_with_other_weights(tmp_path):
    """load_adapter into an adapter whose shadow network holds other values: every tensor is replaced."""
    source = build(fastpeft, "narrow_shadow")
    source.save_pretrained(str(tmp_path))
    target = build(fastpeft, "narrow_shadow", seed=9)
    assert (models.forward(target, INPUTS) - models.forward(source, INPUTS)).abs().max() > 100 * TOL
    result = target.load_adapter(str(tmp_path), adapter_name="default")
    assert result.clean
    close(models.forward(target, INPUTS), models.forward(source, INPUTS), "reloaded")


def test_low_cpu_mem_usage_load(tmp_path):
    """The new adapter (shadow backbone included) is built on the meta device and takes the file's tensors."""
    source = build(fastpeft, "narrow_shadow")
    source.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    close(models.forward(loaded, INPUTS), models.forward(source, INPUTS), "low_cpu_mem_usage")


def test_shadow_network_of_another_shape_is_refused(tmp_path):
    source = build(fastpeft, "narrow_shadow")
    source.save_pretrained(str(tmp_path))
    oh.rewrite_config(tmp_path, shadow_intermediate_size=20)
    base = models.make_llama()
    before = models.forward(base, INPUTS)
    with pytest.raises(ValueError, match="another shape in the file"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path))
    assert not any(isinstance(m, ShadowLayer) for m in base.modules()) and not base._forward_pre_hooks
    close(models.forward(base, INPUTS), before, "base after the refused load")


def test_file_without_shadow_network_is_refused_and_model_unchanged(tmp_path):
    from safetensors.torch import save_file

    source = build(fastpeft, "default")
    source.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if ".shadow_backbone." not in k}, str(path))
    target = build(fastpeft, "default", seed=3)
    before = models.forward(target, INPUTS)
    with pytest.raises(ValueError, match="lacks .* shadow network tensor"):
        target.load_adapter(str(tmp_path), adapter_name="default")
    close(models.forward(target, INPUTS), before, "after the refused load")
    with pytest.raises(ValueError, match="lacks .* shadow network tensor"):
        fastpeft.PeftModel.from_pretrained(models.make_llama(), str(tmp_path))


# ---------------------------------------------------------------------------------------------- generate
def test_greedy_generate_with_cache_equals_full_forwards():
    """generate threads a ShadowCache (base + shadow backbone caches); the tokens equal greedy decoding by
    full forwards without a cache, and differ from the base model's."""
    model = build(fastpeft, "default")
    ids, mask = INPUTS["input_ids"], torch.ones_like(INPUTS["input_ids"])
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, greedy_reference(model, ids, mask, max_new_tokens=6))
    assert not torch.equal(got, greedy_reference(models.make_llama(), ids, mask, max_new_tokens=6))
    left = mask.clone()
    left[0, :2] = 0  # left padding
    got = model.generate(input_ids=ids, attention_mask=left, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, greedy_reference(model, ids, left, max_new_tokens=5))


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the cache each step: the ShadowCache reorders both halves, so the result equals
    beam search without any cache (every step a full forward)."""
    model = build(fastpeft, "default")
    ids, mask = INPUTS["input_ids"], torch.ones_like(INPUTS["input_ids"])
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=3,
                   num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    cached, uncached = model.generate(**options, use_cache=True), model.generate(**options, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    close(cached.sequences_scores, uncached.sequences_scores, "beam scores")


def test_cached_steps_equal_a_full_forward():
    """Prefill, then one token at a time passing back the returned ShadowCache: the logits of each step equal
    those of one forward over the whole sequence."""
    model = build(fastpeft, "narrow_shadow")
    ids = INPUTS["input_ids"][:1]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :3], use_cache=True)
        cache = out.cache
        assert isinstance(cache, ShadowCache) and cache.shadow is not None
        steps = [out.logits]
        for t in range(3, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    close(torch.cat(steps, dim=1), full, "cached steps")
    assert cache.get_seq_length() == ids.shape[1] == cache.shadow.get_seq_length()


def test_plain_filled_cache_is_refused():
    """A base-only cache with past tokens has no shadow counterpart: refused instead of a wrong s0."""
    from transformers import DynamicCache

    model = build(fastpeft, "default")
    ids = INPUTS["input_ids"][:1]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :3], use_cache=True).cache.base
        assert isinstance(cache, DynamicCache)
        with pytest.raises(ValueError, match="not a ShadowCache"):
            model(input_ids=ids[:, 3:4], cache=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------- detached
@pytest.mark.parametrize("case", ["default", "narrow_shadow", "own_embeddings", "cls"])
def test_detached_shadow_model_like_hf(case):
    ours, theirs = build(fastpeft, case), build(peft, case)
    mine, hf_detached = ours.base_model.unload_shadow(), theirs.base_model.unload_shadow()
    task = CASES[case][0]
    with torch.no_grad():
        got = mine(**INPUTS, labels=labels_for(task))
        expected = hf_detached(**INPUTS, labels=labels_for(task))
    close(got.logits, expected.logits, "detached logits")
    close(got.loss, expected.loss, "detached loss")
    run(ours, case)  # the detached model computes the state the auxiliary loss trains
    close(got.loss, ours.base_model.last_shadow_loss, "detached loss == shadow_loss")


def test_detached_copy_saves_complete_and_generates(tmp_path):
    from transformers import AutoModel

    hf_copy = build(peft, "default").base_model.unload_shadow(copy=True)
    hf_copy.save_pretrained(str(tmp_path / "hf"))
    model = build(fastpeft, "default")
    model.base_model.unload_shadow(copy=True).save_pretrained(str(tmp_path / "ours"))
    ours_file, hf_file = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ours", "hf"))
    assert sorted(ours_file) == sorted(hf_file) and "backbone.embed_tokens.weight" in ours_file
    shared, copied = model.base_model.unload_shadow(), model.base_model.unload_shadow(copy=True)
    assert copied.backbone is not model.base_model.shadow_backbone["default"]
    assert shared.backbone is model.base_model.shadow_backbone["default"]
    close(models.forward(copied, INPUTS), models.forward(shared, INPUTS), "copy")
    ids, mask = INPUTS["input_ids"], torch.ones_like(INPUTS["input_ids"])
    got = copied.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, greedy_reference(copied, ids, mask, max_new_tokens=5))
    copied.backbone.save_pretrained(str(tmp_path / "backbone"))
    reloaded = AutoModel.from_pretrained(str(tmp_path / "backbone"))
    close(reloaded.get_input_embeddings().weight, model.get_base_model().get_input_embeddings().weight,
          "embeddings")


# ---------------------------------------------------------------------------------------------- adapters
def test_second_adapter_switching_and_deleting_like_hf():
    models_ = []
    for lib in (fastpeft, peft):
        model = build(lib, "default")
        torch.manual_seed(11)
        model.add_adapter("other", lib.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0,
                                                    init_weights=False))
        models_.append(model.eval())
    ours, theirs = models_
    for model in models_:  # both trainable only where active: the inactive adapter's backbone too
        model.set_adapter("other")
    assert _trainable(ours) == _trainable(theirs)
    assert any(".shadow_backbone.other." in n for n in _trainable(ours))
    for model in models_:
        model.set_adapter("default")
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours, adapter_name="other"),
                              peft.get_peft_model_state_dict(theirs, adapter_name="other"))
    default = models.forward(ours, INPUTS)
    for model in models_:
        model.set_adapter("other")
    close(run(ours, "default").loss, run(theirs, "default").loss, "other adapter")
    assert (models.forward(ours, INPUTS) - default).abs().max() > 100 * TOL
    ours.delete_adapter("other")
    ours.set_adapter("default")
    close(models.forward(ours, INPUTS), default, "after deleting 'other'")
    assert not any(".other" in n for n, _ in ours.named_parameters())


def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_disable_and_unload_give_the_base_model():
    model = build(fastpeft, "default")
    base = models.forward(models.make_llama(), INPUTS)
    with model.disable_adapter():
        close(models.forward(model, INPUTS), base, "disabled")
    plain = model.unload()
    assert not any(isinstance(m, ShadowLayer) for m in plain.modules())
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    close(models.forward(plain, INPUTS), base, "unloaded")


def test_disabled_adapter_reports_no_shadow_loss():
    model = build(fastpeft, "default")
    with model.disable_adapter():
        out = run(model, "default")
    assert getattr(out, "shadow_loss", None) is None and model.base_model.last_shadow_loss is None
