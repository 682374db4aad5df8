"""`AutoPeftModel*`: load the base model named in an adapter's config, then the adapter on top."""

from __future__ import annotations

import importlib
import os
from typing import Any

from .checkpoint import io, validate
from .config import PeftConfig
from .peft_model import PeftModel
from .tasks import TASK_CLASSES

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class _BaseAutoPeftModel:
    _target_class: str | None = None  # transformers Auto class name
    _target_peft_class: type[PeftModel] = PeftModel
    _task_type: str | None = None

    def __init__(self, *args, **kwargs):
        raise OSError(f"Use {type(self).__name__}.from_pretrained(path_or_repo) to build this class.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        revision: str | None = None, import_allowlist: list[str] | None = None,
                        **kwargs: Any) -> PeftModel:
        """Load the base model the adapter names, then the adapter. Remote code (the base's or the adapter
        tokenizer's) runs only with an explicit `trust_remote_code=True`; a config's `auto_mapping` may only
        import packages in `import_allowlist` (default: diffusers, lerobot, megatron-core, transformers), as
        HF PEFT."""
        hub_kwargs, model_kwargs = io.split_hub_kwargs(kwargs)
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision,
                                                           **hub_kwargs)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"The adapter at {pretrained_model_name_or_path} names no base model "
                "(base_model_name_or_path is empty): load the base yourself and use "
                "PeftModel.from_pretrained(base, path)."
            )
        task = getattr(peft_config.task_type, "value", peft_config.task_type)
        if cls._task_type is not None and task != cls._task_type:
            raise ValueError(
                f"This adapter was saved for task_type={task!r}, not {cls._task_type!r}; use the matching "
                f"AutoPeftModelFor* class (or AutoPeftModel)."
            )
        base_cls = cls._base_class(peft_config, task, import_allowlist)
        trust = bool(model_kwargs.pop("trust_remote_code", False))  # never implicit: only the caller's True
        if trust or base_cls.__module__.startswith("transformers"):
            model_kwargs["trust_remote_code"] = trust
        base = base_cls.from_pretrained(base_path, revision=peft_config.revision, **model_kwargs)
        _resize_to_adapter_tokenizer(base, pretrained_model_name_or_path, hub_kwargs, trust)
        peft_cls = cls._target_peft_class if cls._task_type else TASK_CLASSES.get(task, PeftModel)
        return peft_cls.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                        is_trainable=is_trainable, config=peft_config, **hub_kwargs)

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, task: str | None,
                    import_allowlist: list[str] | None = None):
        import transformers

        if cls._target_class is not None:
            return getattr(transformers, cls._target_class)
        if task in _AUTO_FOR_TASK:
            return getattr(transformers, _AUTO_FOR_TASK[task])
        mapping = peft_config.auto_mapping or {}
        if mapping.get("parent_library") and mapping.get("base_model_class"):
            validate.check_import_allowlist(mapping["parent_library"], import_allowlist)  # the file names it
            module = importlib.import_module(mapping["parent_library"])
            return getattr(module, mapping["base_model_class"])
        return transformers.AutoModel


def _resize_to_adapter_tokenizer(base, adapter_path, hub_kwargs, trust_remote_code: bool = False) -> None:
    """If the adapter folder ships a tokenizer with more tokens, grow the base embeddings to match."""
    if not any(io.resolve_file(adapter_path, f, **dict(hub_kwargs)) for f in _TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_path, trust_remote_code=trust_remote_code, **hub_kwargs)
    embeddings = base.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


_AUTO_FOR_TASK = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _auto(name: str, task: str | None) -> type:
    attrs = {"_task_type": task, "_target_class": _AUTO_FOR_TASK.get(task) if task else None,
             "_target_peft_class": TASK_CLASSES.get(task, PeftModel)}
    return type(name, (_BaseAutoPeftModel,), attrs)


AutoPeftModel = _auto("AutoPeftModel", None)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification", "SEQ_CLS")
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", "TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", "QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "FEATURE_EXTRACTION")
