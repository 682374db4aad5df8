"""HF PEFT's module path `peft.tuners.lora.config`: LoraConfig and the sub-configs HF PEFT keeps beside it."""

from ...methods.lora.config import LoraConfig, LoraRuntimeConfig
from ...methods.lora.inits.corda import CordaConfig
from ...methods.lora.inits.eva_config import EvaConfig
from ...methods.lora.inits.loftq_config import LoftQConfig
from ...methods.lora.inits.lora_ga import LoraGAConfig
from ...methods.lora.variants.arrow import ArrowConfig
from ...methods.lora.variants.bdlora import BdLoraConfig
from ...methods.lora.variants.kasa import KasaConfig
from ...methods.lora.variants.monteclora import MontecloraConfig
from ...methods.lora.variants.velora import VeloraConfig

__all__ = ["ArrowConfig", "BdLoraConfig", "CordaConfig", "EvaConfig", "KasaConfig", "LoftQConfig",
           "LoraConfig", "LoraGAConfig", "LoraRuntimeConfig", "MontecloraConfig", "VeloraConfig"]
