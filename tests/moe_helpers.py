"""A tiny Mixtral (experts as stacked parameters, transformers v5) and the output / config comparisons shared
by tests/methods/test_target_parameters.py and test_moe_conversion.py."""

from __future__ import annotations

import torch


def make_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                        num_experts_per_tok=2, max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def mixtral_inputs():
    gen = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=gen)}


def out(model, inputs):
    with torch.no_grad():
        result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result


def comparable(config):
    skip = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision"}
    return {k: (sorted(v) if isinstance(v, (list, set)) else v) for k, v in config.items() if k not in skip}
