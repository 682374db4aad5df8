"""fastpeft: parameter-efficient fine-tuning, a drop-in for HF PEFT (same names, same adapter files)."""

from . import (
    hotswap,  # noqa: F401  (HF PEFT's peft.utils.hotswap API, also as fastpeft.utils.hotswap)
    methods,  # noqa: F401  (registers every method)
    optimizers,  # noqa: F401  (create_loraplus_optimizer / create_lorafa_optimizer, as peft.optimizers)
)
from .api import get_peft_config, get_peft_model, inject_adapter_in_model
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .checkpoint.io import load_peft_weights
from .checkpoint.keys import get_peft_model_state_dict, set_peft_model_state_dict
from .config import PeftConfig, PromptLearningConfig
from .core.checks import is_strict, set_strict, strict
from .errors import (
    AdapterConfigError,
    AdapterFileNotFoundError,
    AdapterLoadError,
    AdapterStateError,
    FastPeftError,
    LossyMergeError,
    NoMatchingPeftModuleError,
    PeftError,
    UnsafeAdapterFileError,
)
from .methods.adalora import AdaLoraConfig, AdaLoraModel
from .methods.adamss import AdamssConfig, AdamssModel
from .methods.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from .methods.beft import BeftConfig, BeftModel
from .methods.boft import BOFTConfig, BOFTModel
from .methods.bottleneck import BottleneckConfig, BottleneckModel, load_adapterhub_adapter
from .methods.c3a import C3AConfig, C3AModel
from .methods.cartridge import CartridgeConfig, CartridgeEncoder
from .methods.cartridge.utils import (
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)
from .methods.cpt import CPTConfig, CPTEmbedding
from .methods.deft import DeftConfig, DeftModel
from .methods.delora import DeloraConfig, DeloraModel
from .methods.fourierft import FourierFTConfig, FourierFTModel
from .methods.frod import FrodConfig, FrodModel
from .methods.glora import GloraConfig, GloraModel
from .methods.gralora import GraloraConfig, GraloraModel
from .methods.hira import HiraConfig, HiraModel
from .methods.hra import HRAConfig, HRAModel
from .methods.ia3 import IA3Config, IA3Model
from .methods.lily import LilyConfig, LilyModel
from .methods.ln_tuning import LNTuningConfig, LNTuningModel
from .methods.loha import LoHaConfig, LoHaModel
from .methods.lokr import LoKrConfig, LoKrModel
from .methods.lora import LoraConfig, LoraModel, LoraRuntimeConfig
from .methods.lora.inits.corda import CordaConfig, preprocess_corda
from .methods.lora.inits.eva import get_eva_state_dict, initialize_lora_eva_weights
from .methods.lora.inits.eva_config import EvaConfig
from .methods.lora.inits.loftq_config import LoftQConfig
from .methods.lora.inits.loftq_replace import replace_lora_weights_loftq
from .methods.lora.inits.lora_ga import LoraGAConfig, preprocess_loraga
from .methods.lora.variants.arrow import ArrowConfig, create_arrow_model
from .methods.lora.variants.bdlora import BdLoraConfig
from .methods.lora.variants.kasa import KasaConfig
from .methods.lora.variants.monteclora import MontecloraConfig
from .methods.lora.variants.velora import VeloraConfig
from .methods.miss import MissConfig, MissModel
from .methods.multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from .methods.oft import OFTConfig, OFTModel
from .methods.osf import OSFConfig, OSFModel
from .methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.peanut import PeanutConfig, PeanutModel
from .methods.poly import PolyConfig, PolyModel
from .methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .methods.psoft import PsoftConfig, PsoftModel
from .methods.pvera import PveraConfig, PveraModel
from .methods.randlora import RandLoraConfig, RandLoraModel
from .methods.road import RoadConfig, RoadModel
from .methods.shadow import ShadowConfig, ShadowModel
from .methods.shira import ShiraConfig, ShiraModel
from .methods.supertuning import SupertuningConfig, SupertuningModel
from .methods.tinylora import TinyLoraConfig, TinyLoraModel
from .methods.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .methods.unilora import UniLoraConfig, UniLoraModel
from .methods.vblora import VBLoRAConfig, VBLoRAModel
from .methods.vera import VeraConfig, VeraModel
from .methods.waveft import WaveFTConfig, WaveFTModel
from .methods.xlora import XLoraConfig, XLoraModel
from .mixed_model import PeftMixedModel
from .model_utils import (
    cast_mixed_precision_params,
    get_layer_status,
    get_model_status,
    prepare_model_for_kbit_training,
)
from .peft_alias import install_as_peft
from .peft_model import PeftModel
from .tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .types import PeftType, TaskType

__version__ = "0.1.0"

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdamssConfig",
    "AdamssModel",
    "AdapterConfigError",
    "AdapterFileNotFoundError",
    "AdapterLoadError",
    "AdapterStateError",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "ArrowConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BOFTConfig",
    "BOFTModel",
    "BdLoraConfig",
    "BeftConfig",
    "BeftModel",
    "BottleneckConfig",
    "BottleneckModel",
    "C3AConfig",
    "C3AModel",
    "CPTConfig",
    "CPTEmbedding",
    "CartridgeConfig",
    "CartridgeEncoder",
    "CordaConfig",
    "DeftConfig",
    "DeftModel",
    "DeloraConfig",
    "DeloraModel",
    "EvaConfig",
    "FastPeftError",
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
    "KasaConfig",
    "LNTuningConfig",
    "LNTuningModel",
    "LilyConfig",
    "LilyModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "LossyMergeError",
    "MissConfig",
    "MissModel",
    "MontecloraConfig",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "NoMatchingPeftModuleError",
    "OFTConfig",
    "OFTModel",
    "OSFConfig",
    "OSFModel",
    "PeanutConfig",
    "PeanutModel",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PolyConfig",
    "PolyModel",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
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
    "TaskType",
    "TinyLoraConfig",
    "TinyLoraModel",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "UniLoraConfig",
    "UniLoraModel",
    "UnsafeAdapterFileError",
    "VBLoRAConfig",
    "VBLoRAModel",
    "VeloraConfig",
    "VeraConfig",
    "VeraModel",
    "WaveFTConfig",
    "WaveFTModel",
    "XLoraConfig",
    "XLoraModel",
    "cast_mixed_precision_params",
    "compose_cartridge_adapters",
    "create_arrow_model",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "install_as_peft",
    "is_strict",
    "load_adapterhub_adapter",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "preprocess_loraga",
    "prompt_embeddings_from_past_key_values",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
    "set_strict",
    "strict",
]


def __getattr__(name: str):
    # a transformers TrainerCallback: transformers is imported on first use only
    if name == "AdaLoraCallback":
        from .methods.adalora import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
