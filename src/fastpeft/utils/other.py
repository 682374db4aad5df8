"""HF PEFT's module path `peft.utils.other` (code: core/auxiliary.py, model_utils.py,
integrations/fsdp.py)."""

from ..core.auxiliary import AuxiliaryTrainingWrapper, ModulesToSaveWrapper  # noqa: F401
from ..integrations.fsdp import fsdp_auto_wrap_policy  # noqa: F401
from ..model_utils import _get_submodules, cast_mixed_precision_params, infer_device  # noqa: F401
