"""What the ShadowPEFT test files share: the tiny bases, the cases, building an adapter in either library."""

from __future__ import annotations

import pytest
import torch

import models

TOL = 1e-5


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}")


def make_llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                      pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(models.SEED)
    return LlamaForSequenceClassification(cfg).eval()


INPUTS = models.llama_inputs()  # 2 x 6 tokens, the last row right-padded by 2
CLS_LABELS = torch.tensor([2, 0])
BASES = {"CAUSAL_LM": models.make_llama, "SEQ_CLS": make_llama_cls}
CASES = {
    "default": ("CAUSAL_LM", {}),
    "narrow_shadow": ("CAUSAL_LM", dict(shadow_hidden_size=16, shadow_num_attention_heads=2,
                                        shadow_intermediate_size=24, shadow_num_hidden_layers=2, r=4)),
    "own_embeddings": ("CAUSAL_LM", dict(share_embeddings=False, update_hidden_size=5, shadow_alpha=0.7)),
    "cls": ("SEQ_CLS", {}),
    "cls_blocks_1_2": ("SEQ_CLS", dict(target_modules=["model.layers.1", "model.layers.2"], r=3)),
}


def labels_for(task: str) -> torch.Tensor:
    return INPUTS["input_ids"] if task == "CAUSAL_LM" else CLS_LABELS


def build(lib, case: str, seed: int = 0, perturbed: bool = True, **overrides):
    """The case's adapter on a fresh base (the same RNG state for both libraries -> the same init), moved off
    its init by seeded noise in sorted name order (both libraries name parameters alike), in eval mode."""
    task, options = CASES[case]
    options = {"shadow_dropout": 0.0, **options, **overrides}
    torch.manual_seed(seed)
    model = lib.get_peft_model(BASES[task](), lib.ShadowConfig(task_type=task, **options))
    if perturbed:
        models.perturb(model, seed=seed + 1, scale=0.3)
    return model.eval()


def run(model, case: str, labels: bool = True):
    task = CASES[case][0]
    with torch.no_grad():
        return model(**INPUTS, labels=labels_for(task) if labels else None)


def unchanged_after(fn, model, match, error=ValueError):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(error, match=match):
        fn()
    assert [n for n, _ in model.named_modules()] == names
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not model._forward_pre_hooks
