"""HF PEFT's module path `peft.utils.other` (code: core/aux.py, model_utils.py)."""

from ..core.aux import AuxiliaryTrainingWrapper, ModulesToSaveWrapper  # noqa: F401
from ..model_utils import _get_submodules, infer_device  # noqa: F401
