"""`PromptTuningConfig` (Lester et al., 2021): trainable virtual-token embeddings prepended to the input."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ...config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "RANDOM, SAMPLE_VOCAB or TEXT."})
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "Text for TEXT init."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer for TEXT init."})
    tokenizer_kwargs: dict | None = field(default=None,
                                          metadata={"help": "AutoTokenizer kwargs for TEXT init."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_init(PromptTuningInit)

    def _check_init(self, enum_cls) -> None:
        allowed = [e.value for e in enum_cls]
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in allowed:
            raise ValueError(f"prompt_tuning_init={init!r} is not one of {allowed}.")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError(
                "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer folder or repo id).")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text.")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'.")
