"""HF PEFT's module path `peft.tuners.tuners_utils`: the base classes every adapter layer / tuner derives
from.

transformers, diffusers and TRL find adapter layers with `isinstance(module, BaseTunerLayer)`: every fastpeft
adapter layer is an `AdapterLayer`.
"""

from ..core.layer import AdapterLayer as BaseTunerLayer
from ..core.targeting import is_target as check_target_module_exists
from ..core.tuner import Tuner as BaseTuner

__all__ = ["BaseTuner", "BaseTunerLayer", "check_target_module_exists"]
