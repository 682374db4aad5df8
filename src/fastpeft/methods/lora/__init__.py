"""LoRA: low-rank adapters on linear, embedding, convolution and multi-head attention layers.

Layout: config.py (LoraConfig, imports no feature) and subconfig.py (the registry of the features' option
checks); layer.py, bnb.py (QLoRA), params.py (target_parameters), gathered.py / lean_dropout.py (fast forward
paths); model.py (LoraModel) with merge.py, tied.py (ensure_weight_tying), replication.py (layer_replication)
and hotswap.py (hot-swap rules); variants/ (DoRA, aLoRA, Arrow, BD-LoRA, KaSA, VeLoRA, MonteCLoRA); inits/
(the init_lora_weights schemes: PiSSA, OLoRA, CorDA, EVA, LoRA-GA, LoftQ, MiCA); conversion/ (adapter files
rewritten on save or load). Importing this package imports every feature, so each registers its config check.
"""

from ...registry import MethodSpec, register
from ...types import PeftType
from . import hotswap
from .config import LoraConfig, LoraRuntimeConfig
from .inits import eva, eva_config, loftq_config, loftq_replace  # noqa: F401 (register their config checks)
from .model import LoraModel
from .variants import arrow  # noqa: F401 (create_arrow_model; the table registers its check too)

register(MethodSpec(peft_type=PeftType.LORA, config_cls=LoraConfig, prefix="lora_", tuner_cls=LoraModel,
                    hotswap=hotswap.RULES, mixable=True))

__all__ = ["LoraConfig", "LoraModel", "LoraRuntimeConfig"]
