"""`LoraConfig`: the fields and defaults of HF PEFT 0.21's LoRA config (all of them, so files round-trip).

Options fastpeft does not implement yet are accepted in files but refused with a clear error when used.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ...config import PeftConfig
from .subconfig import run_checks

logger = logging.getLogger(__name__)

# option -> value meaning "off"; anything else is refused at injection time until implemented
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "use_qalora": False,
    "megatron_config": None,
}

# init_lora_weights values whose init subtracts the adapter's start from the base weight, W <- W - s B0 A0,
# so that base + adapter is unchanged (PiSSA with its pissa_niter_K family, OLoRA, CorDA, LoRA-GA)
BASE_MODIFYING = ("pissa", "olora", "corda", "lora_ga")
PISSA_NITER = r"pissa_niter_([1-9][0-9]*)"  # PiSSA through K subspace iterations of a randomized SVD


def modifies_base(value) -> bool:
    """Whether `init_lora_weights=value` subtracts the initial adapter from the base (PiSSA-style schemes)."""
    if not isinstance(value, str):
        return False
    return value in BASE_MODIFYING or re.fullmatch(PISSA_NITER, value) is not None


def init_rewrites_base(value) -> bool:
    """Whether `init_lora_weights=value` writes the base weight: PiSSA-style schemes and LoftQ (W <- Q(W))."""
    return modifies_base(value) or value == "loftq"


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """s in W + s B A: alpha / r (Hu et al. 2021, eq. 3), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023,
    "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA")."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


@dataclass
class LoraRuntimeConfig:
    """LoRA options that apply to this process only and are never saved (HF PEFT's class of this name)."""

    ephemeral_gpu_offload: bool = field(default=False, metadata={
        "help": "Not implemented by fastpeft yet: True is refused."})

    def __post_init__(self) -> None:
        if self.ephemeral_gpu_offload:
            raise NotImplementedError(
                "LoraRuntimeConfig(ephemeral_gpu_offload=True) is not supported by fastpeft yet: DoRA's "
                "weight norms are computed on the device that holds the base weights."
            )


@dataclass
class LoraConfig(PeftConfig):
    """Low-Rank Adaptation (Hu et al., 2021): W + (alpha / r) * B @ A with A: (r, in), B: (out, r)."""

    r: int = field(default=8, metadata={"size": "dim", "help": "LoRA rank."})
    target_modules: list[str] | str | None = field(default=None,
                                                   metadata={"help": "Names, regex or 'all-linear'."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    lora_alpha: int = field(default=8, metadata={"help": "Scaling numerator alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    fan_in_fan_out: bool = field(default=False,
                                 metadata={"help": "Base weight stored as (in, out), e.g. Conv1D."})
    bias: Literal["none", "all", "lora_only"] = field(default="none",
                                                      metadata={"help": "Which biases to train."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rsLoRA)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_lora_weights: bool | str = field(default=True, metadata={
        "help": "True, False, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_K', 'olora', 'mica', 'corda' "
                "(after corda.preprocess_corda) or 'lora_ga' (after lora_ga.preprocess_loraga); see inits/."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    rank_pattern: dict | None = field(default_factory=dict, metadata={
        "size": "dim_values", "keys": "modules", "help": "Regex -> rank overrides."})
    alpha_pattern: dict | None = field(default_factory=dict, metadata={
        "keys": "modules", "help": "Regex -> alpha overrides."})
    megatron_config: dict | None = field(default=None, metadata={"help": "Not supported by fastpeft."})
    megatron_core: str | None = field(default="megatron.core",
                                      metadata={"help": "Not supported by fastpeft."})
    trainable_token_indices: list[int] | dict | None = field(
        default=None, metadata={
            "size": "token_ids",
            "help": "Token ids whose embedding rows train too (list, or module -> ids)."})
    loftq_config: dict = field(default_factory=dict, metadata={
        "help": "LoftQConfig (or its dict) for init_lora_weights='loftq': NF4/int8 base + error-fitting "
                "adapter (methods/lora/inits/loftq.py)."})
    eva_config: dict | None = field(default=None, metadata={"help": "EvaConfig for init_lora_weights='eva'."})
    corda_config: dict | None = field(default=None, metadata={
        "help": "CordaConfig for init_lora_weights='corda' (run corda.preprocess_corda first)."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: learn a per-output magnitude apart from the LoRA direction (variants/dora.py)."})
    use_qalora: bool = field(default=False, metadata={"help": "Not supported yet."})
    qalora_group_size: int = field(default=16, metadata={"help": "QA-LoRA group size."})
    layer_replication: list | None = field(default=None, metadata={
        "help": "[[start, end), ...] ranges of blocks stacked into a deeper model sharing base weights."})
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig, metadata={
        "help": "Runtime-only options (LoraRuntimeConfig), never saved."})
    lora_bias: bool = field(default=False, metadata={"help": "Give lora_B a trainable bias."})
    target_parameters: list[str] | None = field(default=None, metadata={
        "targets": "parameters",
        "help": "Names (or dotted suffixes) of 2-D/3-D nn.Parameters to adapt, e.g. MoE "
                "experts (params.py)."})
    alora_invocation_tokens: list[int] | None = field(default=None, metadata={
        "help": "Activated LoRA: token ids of the invocation string; the adapter acts only from their last "
                "occurrence on (linear layers, CAUSAL_LM; not mergeable). See variants/alora.py."})
    use_bdlora: dict | None = field(default=None, metadata={
        "help": "BdLoraConfig: block-diagonal LoRA A or B per target, for tensor-parallel serving "
                "(variants/bdlora.py)."})
    arrow_config: dict | None = field(default=None, metadata={
        "help": "ArrowConfig: route tokens among loaded LoRA experts (variants/arrow.py, "
                "create_arrow_model)."})
    ensure_weight_tying: bool = field(default=False, metadata={"help": "Keep tied embeddings tied."})
    kasa_config: dict | None = field(default=None, metadata={
        "help": "KasaConfig: KaSA (variants/kasa.py): truncate the base's r minor singular components, learn "
                "s B diag(d) A."})
    velora_config: dict | None = field(default=None, metadata={
        "help": "VeloraConfig: VeLoRA (variants/velora.py): A's backward from rank-1 sub-token projections "
                "of the input."})
    lora_ga_config: dict | None = field(default=None, metadata={
        "help": "LoraGAConfig for init_lora_weights='lora_ga' (run lora_ga.preprocess_loraga first)."})
    monteclora_config: dict | None = field(default=None, metadata={
        "help": "MontecloraConfig: Monte Carlo perturbed LoRA A in training, plain LoRA in eval "
                "(variants/monteclora.py)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.rank_pattern = self.rank_pattern or {}
        self.alpha_pattern = self.alpha_pattern or {}
        self.loftq_config = self.loftq_config or {}
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        self._validate_init()
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: say which layer indices to adapt.")

    def _validate_init(self) -> None:
        run_checks(self)  # init_lora_weights, eva_config, loftq_config, ...: each feature registers its own
        if (self.use_rslora and (self.rank_pattern or self.alpha_pattern)
            and modifies_base(self.init_lora_weights)):
            logger.warning(
                "use_rslora with rank_pattern/alpha_pattern and init_lora_weights=%r: save_pretrained cannot "
                "convert this adapter to plain LoRA (path_initial_model_for_weight_conversion).",
                self.init_lora_weights)

    def unsupported_options(self) -> list[str]:
        return [k for k, off in UNSUPPORTED_OPTIONS.items() if getattr(self, k) not in (off, None, {}, False)]

    @property
    def rewrites_base_weights(self) -> bool:
        """True where injection changes the base model itself: inits that write the base weight (PiSSA, OLoRA,
        CorDA, LoRA-GA, LoftQ), KaSA's truncation, layer_replication's stacked copies of blocks. Loading
        backs those weights up (checkpoint/loading.py); no base-model fingerprint is saved for them
        (checkpoint/fingerprint.py)."""
        return (init_rewrites_base(self.init_lora_weights) or getattr(self, "kasa_config", None) is not None
                or bool(self.layer_replication))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("runtime_config", None)
        return data
