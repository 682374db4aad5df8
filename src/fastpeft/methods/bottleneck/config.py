"""`BottleneckConfig`: bottleneck adapters with the fields of the `adapters` library's `BnConfig`.

Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751), Pfeiffer et al. 2020
(https://arxiv.org/abs/2005.00247) and the parallel adapters of He et al. 2022
(https://arxiv.org/abs/2110.04366). HF PEFT has no such method: `peft_type` "BOTTLENECK" is fastpeft's own.
Every field keeps the name, meaning and default it has in `adapters` 1.3 (the defaults are its `SeqBnConfig`,
the Pfeiffer adapter `add_adapter` uses when given no config); options fastpeft does not implement are
refused here, with the reason, instead of being accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig

# the adapters library's init schemes (layer.py draws each as it does)
INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")
SCALING_MODES = ("learned", "channel")
# the non-linearities of transformers' ACT2FN that AdapterHub configs name, plus its own "leakyrelu"
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "silu",
                   "swish", "tanh", "sigmoid", "leakyrelu", "mish", "relu6", "linear")

# options of BnConfig that fastpeft refuses, with the reason (value that is accepted, why)
REFUSED_OPTIONS = {
    "phm_layer": (False, "Compacter's PHM (Kronecker-factored) projections are not implemented"),
    "inv_adapter": (None, "invertible adapters act on the embedding output, not inside a transformer layer, "
                          "and are not implemented"),
    "cross_adapter": (False, "cross-attention adapters need an encoder-decoder; the supported architectures "
                             "(architectures.py) have none"),
    "stochastic_depth": (0.0, "stochastic depth (torchvision's row-wise drop path) is not implemented"),
}
# Compacter's PHM settings: only meaningful with phm_layer, kept so AdapterHub configs read unchanged
PHM_FIELDS = ("phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule",
              "phm_c_init", "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank",
              "phm_bias")

PRESETS: dict[str, dict] = {
    # Pfeiffer et al. (SeqBnConfig, "seq_bn" / "pfeiffer"): one adapter after the feed-forward block
    "pfeiffer": {},
    # Houlsby et al. (DoubleSeqBnConfig, "double_seq_bn" / "houlsby"): after attention and after the FFN
    "houlsby": {"mh_adapter": True, "original_ln_before": False, "non_linearity": "swish"},
    # He et al. (ParBnConfig, "par_bn" / "parallel"): beside the FFN, on its input, scaled by 4
    "parallel": {"original_ln_before": False, "reduction_factor": 2, "init_weights": "mam_adapter",
                 "is_parallel": True, "scaling": 4.0},
}
PRESET_ALIASES = {"seq_bn": "pfeiffer", "double_seq_bn": "houlsby", "par_bn": "parallel"}


@dataclass
class BottleneckConfig(PeftConfig):
    """A small MLP (down-projection, non-linearity, up-projection) inside the output blocks of each
    transformer layer (dense -> dropout -> adapter -> residual + LayerNorm), as the `adapters` library
    (AdapterHub) places it. Presets: `BottleneckConfig.pfeiffer()`, `.houlsby()`, `.parallel()`; AdapterHub
    folders load with `fastpeft.load_adapterhub_adapter`. Not mergeable (the adapter is non-linear).
    """

    mh_adapter: bool = field(default=False, metadata={
        "help": "Add an adapter after the multi-head attention block of each layer (its output block)."})
    output_adapter: bool = field(default=True, metadata={
        "help": "Add an adapter after the feed-forward block of each layer (its output block)."})
    reduction_factor: float | dict[str, float] = field(default=16, metadata={
        "help": "hidden_size / bottleneck size; or {layer index (str): factor, 'default': factor}. Below 1 "
                "the bottleneck is wider than the hidden size."})
    non_linearity: str = field(default="relu", metadata={
        "help": f"Activation between the projections (transformers' ACT2FN names): one of "
                f"{NON_LINEARITIES}."})
    original_ln_before: bool = field(default=True, metadata={
        "help": "Apply the block's residual connection and pre-trained LayerNorm before the adapter (not for "
                "parallel adapters)."})
    original_ln_after: bool = field(default=True, metadata={
        "help": "Apply the block's residual connection and pre-trained LayerNorm after the adapter."})
    ln_before: bool = field(default=False, metadata={"help": "A new LayerNorm before the down-projection."})
    ln_after: bool = field(default=False, metadata={"help": "A new LayerNorm after the up-projection."})
    init_weights: str = field(default="bert", metadata={
        "help": "'bert': N(0, 0.02) projections, zero biases; 'mam_adapter': Kaiming-uniform down, zero up "
                "(the adapter starts as a no-op); 'houlsby': truncated N(0, 0.01) projections, zero biases."})
    init_weights_seed: int | None = field(default=None, metadata={
        "help": "If set, the global torch seed is reset to it before each adapter module is initialised (all "
                "modules start equal), as the adapters library does."})
    is_parallel: bool = field(default=False, metadata={
        "help": "Parallel adapter (He et al.): it reads the block's input and its output is added to the "
                "block's output."})
    scaling: float | str = field(default=1.0, metadata={
        "help": "Factor on the adapter output: a number, 'learned' (one trained scalar) or 'channel' (a "
                "trained vector of hidden_size)."})
    use_gating: bool = field(default=False, metadata={
        "help": "A trained gate sigmoid(Linear(x)), averaged over the sequence, multiplies the adapter "
                "output (UniPELT)."})
    residual_before_ln: bool | str = field(default=True, metadata={
        "help": "Residual around the adapter taken before the original LayerNorm (True), after it (False), "
                "or 'post_add': after the block's residual addition (needs original_ln_before)."})
    adapter_residual_before_ln: bool = field(default=False, metadata={
        "help": "With ln_after: add the adapter's residual before the new LayerNorm instead of after it."})
    leave_out: list[int] = field(default_factory=list, metadata={
        "help": "Indices (from 0) of the transformer layers that get no adapter."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter output."})
    inv_adapter: str | None = field(default=None, metadata={"help": "Invertible adapter: refused (not "
                                                                   "implemented); must be None."})
    inv_adapter_reduction_factor: float | None = field(default=None, metadata={
        "help": "Reduction factor of the invertible adapter (unused: inv_adapter is refused)."})
    cross_adapter: bool = field(default=False, metadata={"help": "Cross-attention adapters: refused (the "
                                                                 "supported architectures have none)."})
    phm_layer: bool = field(default=False, metadata={"help": "Compacter PHM projections: refused (not "
                                                             "implemented)."})
    phm_dim: int = field(default=4, metadata={"help": "Compacter setting (unused: phm_layer is refused)."})
    factorized_phm_W: bool | None = field(default=True, metadata={"help": "Compacter setting (unused)."})
    shared_W_phm: bool | None = field(default=False, metadata={"help": "Compacter setting (unused)."})
    shared_phm_rule: bool | None = field(default=True, metadata={"help": "Compacter setting (unused)."})
    factorized_phm_rule: bool | None = field(default=False, metadata={"help": "Compacter setting (unused)."})
    phm_c_init: str | None = field(default="normal", metadata={"help": "Compacter setting (unused)."})
    phm_init_range: float | None = field(default=0.0001, metadata={"help": "Compacter setting (unused)."})
    learn_phm: bool | None = field(default=True, metadata={"help": "Compacter setting (unused)."})
    hypercomplex_nonlinearity: str | None = field(default="glorot-uniform",
                                                  metadata={"help": "Compacter setting (unused)."})
    phm_rank: int | None = field(default=1, metadata={"help": "Compacter setting (unused)."})
    phm_bias: bool | None = field(default=True, metadata={"help": "Compacter setting (unused)."})
    stochastic_depth: float | None = field(default=0.0, metadata={"help": "Stochastic depth: refused unless "
                                                                          "0."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Other modules trained and saved whole (e.g. a new classifier head)."})

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> BottleneckConfig:
        """The config of an AdapterHub preset name ('pfeiffer' / 'seq_bn', 'houlsby' / 'double_seq_bn',
        'parallel' / 'par_bn'), with `overrides` applied."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"Unknown bottleneck preset {name!r}; known: "
                             f"{sorted(PRESETS) + sorted(PRESET_ALIASES)}.")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def pfeiffer(cls, **overrides) -> BottleneckConfig:
        """Pfeiffer et al. 2020 (AdapterHub's `SeqBnConfig`): after the FFN, ReLU, reduction 16."""
        return cls.preset("pfeiffer", **overrides)

    @classmethod
    def houlsby(cls, **overrides) -> BottleneckConfig:
        """Houlsby et al. 2019 (AdapterHub's `DoubleSeqBnConfig`): after attention and FFN, swish, reduction
        16."""
        return cls.preset("houlsby", **overrides)

    @classmethod
    def parallel(cls, **overrides) -> BottleneckConfig:
        """He et al. 2022 (AdapterHub's `ParBnConfig`): parallel to the FFN, ReLU, reduction 2, scaling 4,
        zero-initialised up-projection."""
        return cls.preset("parallel", **overrides)

    @classmethod
    def from_adapterhub(cls, path_or_config, **overrides) -> BottleneckConfig:
        """The config of an AdapterHub adapter folder (its `adapter_config.json`) or of such a config dict
        (the folder file's "config" entry, or the file's whole content); unsupported options are refused."""
        from .adapterhub import config_from_adapterhub

        return config_from_adapterhub(path_or_config, **overrides)

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("BottleneckConfig adds no adapter: set mh_adapter=True (after attention) and/or "
                             "output_adapter=True (after the feed-forward block).")
        self._check_refused()
        self._check_values()

    def _check_refused(self) -> None:
        for option, (accepted, why) in REFUSED_OPTIONS.items():
            value = getattr(self, option)
            if value != accepted and not (option == "stochastic_depth" and not value):
                raise NotImplementedError(
                    f"BottleneckConfig.{option}={value!r} is not supported: {why}. Leave it at {accepted!r}.")

    def _check_values(self) -> None:
        if isinstance(self.reduction_factor, dict):  # layer indices as strings, as JSON and AdapterHub
            self.reduction_factor = {str(k): v for k, v in self.reduction_factor.items()}
        factors = self.reduction_factor
        values = factors.values() if isinstance(factors, dict) else [factors]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"BottleneckConfig.reduction_factor must be a positive number or a dict of them "
                             f"(layer index or 'default' -> factor), got {factors!r}.")
        if self.non_linearity is None or self.non_linearity.lower() not in NON_LINEARITIES:
            raise ValueError(f"BottleneckConfig.non_linearity must be one of {NON_LINEARITIES}, got "
                             f"{self.non_linearity!r}.")
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(f"BottleneckConfig.init_weights must be one of {INIT_SCHEMES}, got "
                             f"{self.init_weights!r}.")
        bad_scaling = isinstance(self.scaling, bool) or (
            isinstance(self.scaling, str) and self.scaling not in SCALING_MODES)
        if bad_scaling or not isinstance(self.scaling, (int, float, str)):
            raise ValueError(f"BottleneckConfig.scaling must be a number, 'learned' or 'channel', got "
                             f"{self.scaling!r}.")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"BottleneckConfig.residual_before_ln must be True, False or 'post_add', got "
                             f"{self.residual_before_ln!r}.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before and not self.is_parallel:
            raise ValueError("BottleneckConfig.residual_before_ln='post_add' takes the residual after the "
                             "block's residual addition, which only happens with original_ln_before=True.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out or []):
            raise ValueError(f"BottleneckConfig.leave_out must be a list of layer indices >= 0, got "
                             f"{self.leave_out!r}.")

    def factor_for(self, layer: int) -> float:
        """The reduction factor of transformer layer `layer` (a per-layer dict needs a 'default' entry for the
        layers it does not name, as in the adapters library)."""
        factors = self.reduction_factor
        if not isinstance(factors, dict):
            return factors
        if str(layer) in factors:
            return factors[str(layer)]
        if "default" in factors:
            return factors["default"]
        raise ValueError(f"BottleneckConfig.reduction_factor={factors!r} names no factor for layer {layer} "
                         "and has no 'default' entry; add one, e.g. {'1': 8, 'default': 16}.")
