"""HF PEFT's module path `peft.utils`: re-exports (the code lives in checkpoint/, core/ and
model_utils.py)."""

from ..checkpoint.io import load_peft_weights
from ..checkpoint.keys import get_peft_model_state_dict, set_peft_model_state_dict
from ..core.auxiliary import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from ..model_utils import (
    _get_submodules,
    cast_mixed_precision_params,
    get_layer_status,
    get_model_status,
    infer_device,
    prepare_model_for_kbit_training,
)
from ..types import PeftType, TaskType
from . import (  # noqa: F401
    constants,
    error,
    hotswap,
    merge_utils,
    other,
    save_and_load,
    transformers_weight_conversion,
)
from .constants import *  # noqa: F403  (the TRANSFORMERS_MODELS_TO_*_MAPPING tables)

__all__ = [
    *constants.__all__,
    "AuxiliaryTrainingWrapper",
    "ModulesToSaveWrapper",
    "PeftType",
    "TaskType",
    "_get_submodules",
    "cast_mixed_precision_params",
    "get_layer_status",
    "get_model_status",
    "get_peft_model_state_dict",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
