"""HF PEFT's module path `peft.tuners.lora`: re-exports of fastpeft.methods.lora (the code lives there)."""

from ...methods.lora import LoraModel
from ...methods.lora.inits.eva import get_eva_state_dict, initialize_lora_eva_weights
from ...methods.lora.inits.lora_ga import preprocess_loraga
from ...methods.lora.layer import Embedding, Linear, LoraLayer, MultiheadAttention
from ...methods.lora.variants.arrow import create_arrow_model
from . import config, layer, model  # noqa: F401  (HF PEFT's submodule paths)
from .config import (
    ArrowConfig,
    BdLoraConfig,
    EvaConfig,
    KasaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    LoraRuntimeConfig,
    MontecloraConfig,
    VeloraConfig,
)

__all__ = ["ArrowConfig", "BdLoraConfig", "Embedding", "EvaConfig", "KasaConfig", "Linear", "LoftQConfig",
           "LoraConfig", "LoraGAConfig", "LoraLayer", "LoraModel", "LoraRuntimeConfig", "MontecloraConfig",
           "MultiheadAttention", "VeloraConfig", "create_arrow_model", "get_eva_state_dict",
           "initialize_lora_eva_weights", "preprocess_loraga"]
