"""HF PEFT's module path `peft.utils`: re-exports (the code lives in checkpoint/, core/ and model_utils.py)."""

from ..checkpoint.io import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from ..checkpoint.keys import get_peft_model_state_dict, set_peft_model_state_dict
from ..core.aux import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
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
from .constants import (
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING,
)

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME",
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
