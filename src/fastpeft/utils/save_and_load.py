"""HF PEFT's module path `peft.utils.save_and_load` (code: fastpeft.checkpoint)."""

from ..checkpoint.io import load_peft_weights  # noqa: F401
from ..checkpoint.keys import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: F401
