"""aLoRA (`alora_invocation_tokens`) against HF PEFT on a tiny llama: forward, generate, files both ways,
errors."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.variants import alora

import models

INVOKE = [5, 6]
TARGETS = ["q_proj", "v_proj", "down_proj"]
PAD = 0

# invocation late / at the start / twice (the last one counts) / absent; row 0 left-padded
IDS = torch.tensor([
    [PAD, PAD, 11, 12, 13, 5, 6, 17, 18, 19],
    [5, 6, 21, 22, 23, 24, 25, 26, 27, 28],
    [31, 5, 6, 33, 34, 35, 5, 6, 38, 39],
    [41, 42, 43, 44, 45, 5, 47, 6, 49, 50],
])
MASK = (torch.arange(10) >= 2).long().unsqueeze(0).expand(4, -1).clone()
MASK[1:] = 1
STARTS = [5, 0, 6, None]  # where each row's last invocation starts (None: absent)


def config(lib, tokens=INVOKE, **extra):
    kw = dict(task_type="CAUSAL_LM", target_modules=TARGETS, r=4, lora_alpha=8,
              alora_invocation_tokens=tokens)
    return lib.LoraConfig(**{**kw, **extra})


def perturb(model, seed=0):
    return models.perturb(model, seed, 0.3)


def pair(**extra):
    """HF PEFT and fastpeft aLoRA models on the same llama with the same adapter weights."""
    hf = perturb(peft.get_peft_model(models.make_llama(), config(peft, **extra))).eval()
    fp = fastpeft.get_peft_model(models.make_llama(), config(fastpeft, **extra)).eval()
    fp.load_state_dict(hf.state_dict())
    names = sorted(n for n, p in hf.named_parameters() if p.requires_grad)
    assert names == sorted(n for n, p in fp.named_parameters() if p.requires_grad)
    return hf, fp


def logits(model, **kw):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**kw).logits


def test_offsets_match_hf_helper():
    from peft.tuners.lora.variants import calculate_alora_offsets

    hf_cfg = {"default": config(peft)}
    assert alora.find_offsets(IDS, INVOKE) == calculate_alora_offsets(hf_cfg, "default", IDS)
    assert alora.find_offsets(IDS, INVOKE) == [None if s is None else 10 - s for s in STARTS]
    assert alora.find_offsets(IDS[:, :1], INVOKE) == [None] * 4  # shorter than the sequence


def test_forward_matches_hf_and_prefix_is_base():
    hf, fp = pair()
    out = logits(fp, input_ids=IDS, attention_mask=MASK)
    torch.testing.assert_close(out, logits(hf, input_ids=IDS, attention_mask=MASK), atol=1e-5, rtol=1e-5)
    base = logits(models.make_llama(), input_ids=IDS, attention_mask=MASK)
    for row, start in enumerate(STARTS):
        before = slice(2 if row == 0 else 0, 10 if start is None else start)  # real tokens before invocation
        torch.testing.assert_close(out[row, before], base[row, before])
        if start is not None:  # the adapter does act from the invocation on
            assert (out[row, start:] - base[row, start:]).abs().amax(-1).min() > 1e-3


def test_gradients_match_hf():
    hf, fp = pair(lora_dropout=0.0)
    grads = []
    for model in (hf, fp):
        model.train()
        model.zero_grad()
        model(input_ids=IDS, attention_mask=MASK).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4)


def test_generate_matches_hf():
    """Greedy generate (KV cache: prefill, then one new token per step), logits of every step compared."""
    hf, fp = pair()
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
              output_logits=True, return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, got = hf.generate(**kw), fp.generate(**kw)
        base = models.make_llama().generate(**kw)
    torch.testing.assert_close(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the row without invocation tokens generates exactly as the base model
    torch.testing.assert_close(got.sequences[3], base.sequences[3])
    torch.testing.assert_close(got.logits[-1][3], base.logits[-1][3])


def test_files_both_directions(tmp_path):
    hf, fp = pair()
    hf.save_pretrained(tmp_path / "hf")
    fp.save_pretrained(tmp_path / "fp")
    for name in ("hf", "fp"):
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert saved["alora_invocation_tokens"] == INVOKE
    want = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fp" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    ref = logits(hf, input_ids=IDS, attention_mask=MASK)
    into_fp = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "hf")
    into_hf = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path / "fp")
    assert into_fp.peft_config["default"].alora_invocation_tokens == INVOKE
    torch.testing.assert_close(logits(into_fp, input_ids=IDS, attention_mask=MASK), ref)
    torch.testing.assert_close(logits(into_hf, input_ids=IDS, attention_mask=MASK), ref)


def test_mixed_batch_matches_hf():
    """adapter_names: an aLoRA adapter, a plain LoRA adapter and the base model in one batch."""
    hf, fp = pair()
    for model, lib in ((hf, peft), (fp, fastpeft)):
        model.add_adapter("plain", lib.LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=2,
                                                  init_lora_weights=False))
    fp.load_state_dict(hf.state_dict())
    names = ["default", "plain", "default", "__base__"]
    want = logits(hf, input_ids=IDS, attention_mask=MASK, adapter_names=names)
    torch.testing.assert_close(logits(fp, input_ids=IDS, attention_mask=MASK, adapter_names=names), want)


def test_explicit_offsets_match_hf():
    hf, fp = pair()
    offsets = [3, None, 10, 1]
    want = logits(hf, input_ids=IDS, attention_mask=MASK, alora_offsets=offsets)
    torch.testing.assert_close(logits(fp, input_ids=IDS, attention_mask=MASK, alora_offsets=offsets), want)


def test_absent_invocation_and_embeds_only_match_hf():
    """No invocation anywhere: both give the base model (HF silently; fastpeft also warns). inputs_embeds
    only: both warn and give the base model."""
    hf, fp = pair()
    ids = IDS[3:]  # row without the invocation sequence
    base = logits(models.make_llama(), input_ids=ids)
    torch.testing.assert_close(logits(hf, input_ids=ids), base)
    with pytest.warns(UserWarning, match="not found in 1 of its 1 rows"):
        got = fp(input_ids=ids).logits.detach()
    torch.testing.assert_close(got, base)
    embeds = hf.get_input_embeddings()(IDS).detach()
    for model in (hf, fp):
        with pytest.warns(UserWarning, match="inputs_embeds"):
            out = model(inputs_embeds=embeds).logits.detach()
        torch.testing.assert_close(out, logits(models.make_llama(), inputs_embeds=embeds))


def test_base_model_call_without_context_is_base():
    """Called below the PeftModel (no offsets computed), an aLoRA adapter stays off in both libraries."""
    hf, fp = pair()
    want = logits(models.make_llama(), input_ids=IDS)
    torch.testing.assert_close(logits(hf.get_base_model(), input_ids=IDS), want)
    torch.testing.assert_close(logits(fp.get_base_model(), input_ids=IDS), want)


@pytest.mark.parametrize("extra, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "embedding"),
    (dict(target_modules=[], target_parameters=["mlp.down_proj.weight"]), "target_parameters"),
])
def test_unsupported_combinations_refused_like_hf(extra, match):
    with pytest.raises(ValueError):
        peft.get_peft_model(models.make_llama(), config(peft, **extra))
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(models.make_llama(), config(fastpeft, **extra))


def test_merge_and_beam_search_refused_like_hf():
    hf, fp = pair()
    for model in (hf, fp):
        with pytest.raises(NotImplementedError, match="merg"):
            model.merge_and_unload()
    hf, fp = pair()
    for model in (hf, fp):
        with pytest.raises(ValueError, match="[Bb]eam search"):
            model.generate(input_ids=IDS, num_beams=2, max_new_tokens=2)


def test_bad_tokens_and_task_warning():
    with pytest.raises(ValueError, match="alora_invocation_tokens must be a list of token ids"):
        fastpeft.LoraConfig(alora_invocation_tokens=["x"])
    for lib in (peft, fastpeft):
        with pytest.warns(UserWarning, match="CAUSAL_LM"):
            lib.LoraConfig(task_type="SEQ_CLS", alora_invocation_tokens=INVOKE)
    # an empty list is off (plain LoRA), as in HF PEFT
    model = fastpeft.get_peft_model(models.make_llama(), config(fastpeft, tokens=[], init_lora_weights=False))
    assert not any(layer.lora_variant for layer in model.tuner.adapter_layers())


def test_num_return_sequences_rows_share_their_prompt_offsets():
    """HF PEFT fails here (offsets not expanded); fastpeft repeats each row's offset for its copies, so
    sampling 2 sequences per prompt equals sampling from the prompts repeated (same seed)."""
    _, fp = pair()
    kw = dict(attention_mask=MASK.repeat_interleave(2, 0), max_new_tokens=4, do_sample=True, pad_token_id=PAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        got = fp.generate(input_ids=IDS, **{**kw, "attention_mask": MASK}, num_return_sequences=2)
        torch.manual_seed(1)
        want = fp.generate(input_ids=IDS.repeat_interleave(2, 0), **kw)
    torch.testing.assert_close(got, want)


def test_gradient_checkpointing_refused_in_training():
    """Deliberate difference: HF PEFT re-registers its hooks for checkpointed recomputation; fastpeft
    refuses."""
    _, fp = pair()
    base = fp.get_base_model()
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    fp.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        fp(input_ids=IDS)
    fp.eval()  # inference is unaffected
    torch.testing.assert_close(logits(fp, input_ids=IDS), logits(pair()[0], input_ids=IDS))
