"""HF PEFT's module path `peft.tuners`: one subpackage per method (re-exports; the code is in
fastpeft.methods)."""

from . import (  # noqa: F401
    adalora,
    adamss,
    adaption_prompt,
    beft,
    boft,
    c3a,
    cartridge,
    cpt,
    deft,
    delora,
    fourierft,
    frod,
    glora,
    gralora,
    hira,
    hra,
    ia3,
    lily,
    ln_tuning,
    loha,
    lokr,
    lora,
    miss,
    mixed,
    multitask_prompt_tuning,
    oft,
    osf,
    p_tuning,
    peanut,
    poly,
    prefix_tuning,
    prompt_tuning,
    psoft,
    pvera,
    randlora,
    road,
    shadow,
    shira,
    supertuning,
    tinylora,
    trainable_tokens,
    tuners_utils,
    unilora,
    vblora,
    vera,
    waveft,
    xlora,
)
from .adalora import AdaLoraConfig, AdaLoraModel
from .adamss import AdamssConfig, AdamssModel
from .adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from .beft import BeftConfig, BeftModel
from .boft import BOFTConfig, BOFTModel
from .c3a import C3AConfig, C3AModel
from .cartridge import CartridgeConfig, CartridgeEncoder
from .deft import DeftConfig, DeftModel
from .delora import DeloraConfig, DeloraModel
from .fourierft import FourierFTConfig, FourierFTModel
from .frod import FrodConfig, FrodModel
from .glora import GloraConfig, GloraModel
from .gralora import GraloraConfig, GraloraModel
from .hira import HiraConfig, HiraModel
from .hra import HRAConfig, HRAModel
from .ia3 import IA3Config, IA3Model
from .lily import LilyConfig, LilyModel
from .ln_tuning import LNTuningConfig, LNTuningModel
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import LoraConfig, LoraModel
from .miss import MissConfig, MissModel
from .mixed import MixedModel
from .multitask_prompt_tuning import MultitaskPromptEmbedding, MultitaskPromptTuningConfig
from .oft import OFTConfig, OFTModel
from .osf import OSFConfig, OSFModel
from .p_tuning import PromptEncoder, PromptEncoderConfig
from .peanut import PeanutConfig, PeanutModel
from .poly import PolyConfig, PolyModel
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .psoft import PsoftConfig, PsoftModel
from .pvera import PveraConfig, PveraModel
from .randlora import RandLoraConfig, RandLoraModel
from .road import RoadConfig, RoadModel
from .shadow import ShadowConfig, ShadowModel
from .shira import ShiraConfig, ShiraModel
from .supertuning import SupertuningConfig, SupertuningModel
from .tinylora import TinyLoraConfig, TinyLoraModel
from .trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .unilora import UniLoraConfig, UniLoraModel
from .vblora import VBLoRAConfig, VBLoRAModel
from .vera import VeraConfig, VeraModel
from .waveft import WaveFTConfig, WaveFTModel
from .xlora import XLoraConfig, XLoraModel

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdamssConfig",
    "AdamssModel",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "BOFTConfig",
    "BOFTModel",
    "BeftConfig",
    "BeftModel",
    "C3AConfig",
    "C3AModel",
    "CartridgeConfig",
    "CartridgeEncoder",
    "DeftConfig",
    "DeftModel",
    "DeloraConfig",
    "DeloraModel",
    "FourierFTConfig",
    "FourierFTModel",
    "FrodConfig",
    "FrodModel",
    "GloraConfig",
    "GloraModel",
    "GraloraConfig",
    "GraloraModel",
    "HiraConfig",
    "HiraModel",
    "HRAConfig",
    "HRAModel",
    "IA3Config",
    "IA3Model",
    "LNTuningConfig",
    "LNTuningModel",
    "LilyConfig",
    "LilyModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoraConfig",
    "LoraModel",
    "MissConfig",
    "MissModel",
    "MixedModel",
    "MultitaskPromptEmbedding",
    "MultitaskPromptTuningConfig",
    "OFTConfig",
    "OFTModel",
    "OSFConfig",
    "OSFModel",
    "PeanutConfig",
    "PeanutModel",
    "PolyConfig",
    "PolyModel",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "PsoftConfig",
    "PsoftModel",
    "PveraConfig",
    "PveraModel",
    "RandLoraConfig",
    "RandLoraModel",
    "RoadConfig",
    "RoadModel",
    "ShadowConfig",
    "ShadowModel",
    "ShiraConfig",
    "ShiraModel",
    "SupertuningConfig",
    "SupertuningModel",
    "TinyLoraConfig",
    "TinyLoraModel",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "UniLoraConfig",
    "UniLoraModel",
    "VBLoRAConfig",
    "VBLoRAModel",
    "VeraConfig",
    "VeraModel",
    "WaveFTConfig",
    "WaveFTModel",
    "XLoraConfig",
    "XLoraModel",
]
