"""Default `target_modules` per transformers `model_type`, used when a config names none (as HF PEFT does)."""

from __future__ import annotations

_QV = ["q_proj", "v_proj"]
# Gemma 4 is multimodal: only the language model's attention (a regex string, as HF PEFT's entry)
GEMMA4 = r".*language_model\..*\.(q_proj|v_proj)"

LORA_TARGETS: dict[str, list[str] | str] = {
    **{t: _QV for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "bart",
        "gptj", "stablelm", "mbart", "m2m_100", "marian", "blenderbot", "blenderbot-small", "pegasus",
        "xglm", "llava", "idefics", "gpt_neo", "olmo", "qwen2_moe", "cohere", "granite", "phi3small",
        "llama4",
    )},
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5", "longt5", "switch_transformers")},
    **{t: ["query", "value"] for t in (
        "bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert", "ernie", "roberta-prelayernorm",
    )},
    **{t: ["query_key_value"] for t in ("gpt_neox", "bloom", "falcon", "RefinedWeb",
                                        "RefinedWebModel", "chatglm")},
    **{t: ["c_attn"] for t in ("gpt2", "gpt_bigcode")},
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "gemma4": GEMMA4,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def model_type_of(model) -> str | None:
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def default_targets(table: dict[str, list[str] | str], model, method: str) -> set[str] | str:
    model_type = model_type_of(model)
    if model_type not in table:
        raise ValueError(
            f"{method}: no default target_modules for model_type={model_type!r}; pass target_modules "
            "explicitly (module names such as ['q_proj', 'v_proj'], a regex string, or 'all-linear')."
        )
    targets = table[model_type]
    # an entry may be a regex string (HF PEFT's tables have a few): it stays one, not a set of characters
    return targets if isinstance(targets, str) else set(targets)
