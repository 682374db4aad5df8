"""The README.md model card written next to a saved adapter (and uploaded by push_to_hub)."""

from __future__ import annotations

from typing import Any


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


_NOT_SHOWN = ("auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
              "peft_type", "task_type")


def model_card(config_dict: dict[str, Any], adapter_name: str, n_params: int, base_class: str,
               defaults: dict[str, Any]) -> str:
    """Markdown with Hub metadata: base model, method, task, the non-default config fields, parameter
    count."""
    base = config_dict.get("base_model_name_or_path")
    method, task = _value(config_dict.get("peft_type")), _value(config_dict.get("task_type"))
    shown = {k: v for k, v in sorted(config_dict.items())
             if k not in _NOT_SHOWN and (k not in defaults or _value(defaults[k]) != v)}
    meta = ["---", "library_name: peft"]
    if base:
        meta.append(f"base_model: {base}")
    meta += ["tags:", f"- {str(method).lower()}", "- fastpeft", "---", ""]
    lines = [
        f"# {method} adapter" + (f" for {base}" if base else ""),
        "",
        f"A {method} adapter ('{adapter_name}') for a {base_class} model"
        + (f", task `{task}`" if task else "") + f": {n_params:,d} trainable parameters.",
        "Saved with fastpeft; loads with fastpeft or HF PEFT (`PeftModel.from_pretrained(base, path)`).",
        "",
        "## Configuration (fields changed from the defaults)",
        "",
        "| field | value |",
        "| --- | --- |",
        *[f"| `{k}` | `{_value(v)}` |" for k, v in shown.items()],
        "",
    ]
    return "\n".join(meta + lines)
