"""Default (IA)^3 targets per transformers `model_type` (the same tables as HF PEFT 0.21).

Each row: model type -> (target_modules, feedforward_modules). The feed-forward entries are the targets whose
input, not output, is rescaled: the paper's l_ff vector in front of the MLP's down projection.
"""

from __future__ import annotations

from ...integrations.transformers_defaults import model_type_of

_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    **{t: (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
       for t in ("gpt_neox", "RefinedWebModel", "RefinedWeb", "falcon")},
    **{t: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for t in ("llama", "mistral")},
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    **{t: (["q_proj", "v_proj", "down_proj"], ["down_proj"])
       for t in ("llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
}

IA3_TARGETS: dict[str, list[str]] = {t: targets for t, (targets, _) in _DEFAULTS.items()}
IA3_FEEDFORWARD: dict[str, list[str]] = {t: ff for t, (_, ff) in _DEFAULTS.items()}


def default_feedforward(model) -> set[str]:
    """`feedforward_modules` for a config that names none: the model type's row, else a clear error."""
    model_type = model_type_of(model)
    if model_type not in IA3_FEEDFORWARD:
        raise ValueError(
            f"IA3: no default feedforward_modules for model_type={model_type!r}; pass feedforward_modules "
            "explicitly: the targets whose input is rescaled (e.g. ['down_proj']), or [] for none."
        )
    return set(IA3_FEEDFORWARD[model_type])
