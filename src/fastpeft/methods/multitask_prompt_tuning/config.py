"""`MultitaskPromptTuningConfig` (Wang et al., 2023): one shared prompt scaled by a low-rank matrix per
task."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ...config import PromptLearningConfig
from ..prompt_tuning.config import PromptTuningConfig


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


# inits that read a source-training checkpoint (prompt_tuning_init_state_dict_path)
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    prompt_tuning_init: MultitaskPromptTuningInit | str = field(
        default=MultitaskPromptTuningInit.RANDOM,
        metadata={"help": "TEXT, RANDOM, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED."})
    prompt_tuning_init_state_dict_path: str | None = field(
        default=None, metadata={"help": "Source-training adapter weights (.safetensors or torch file)."})
    prompt_tuning_init_task: int | None = field(default=0,
                                                metadata={"help": "Source task for EXACT_SOURCE_TASK."})
    num_ranks: int | None = field(default=1, metadata={
        "size": "dim", "help": "Rank of each task's prompt scaling matrix."})
    num_tasks: int | None = field(default=1, metadata={
        "size": "dim", "help": "Number of tasks (valid task_ids: 0..num_tasks-1)."})

    def __post_init__(self) -> None:
        PromptLearningConfig.__post_init__(self)  # PromptTuningConfig's check knows only its own inits
        self._check_init(MultitaskPromptTuningInit)
