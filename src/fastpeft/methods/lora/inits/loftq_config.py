"""`LoftQConfig`: settings of LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
Language Models", https://arxiv.org/abs/2310.08659); HF PEFT 0.21's field names and defaults.

As in HF PEFT, `LoraConfig.loftq_config` holds a plain dict ({"loftq_bits": ..., "loftq_iter": ...}) once the
config is built, so the saved `adapter_config.json` carries the same object in both libraries.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from ..config import lora_scaling
from ..subconfig import coerce, register_check

logger = logging.getLogger(__name__)

# bits -> name of the quantiser LoftQ applies to the base weight (HF PEFT 0.21's `loftq_init` offers these
# two)
LOFTQ_QUANTISERS = {4: "NF4, blocks of 64", 8: "int8, one absmax per row"}


@dataclass
class LoftQConfig:
    """How `init_lora_weights='loftq'` quantises each target weight W and fits the adapter to what is lost.

    loftq_bits: bits of the quantised base (4: NF4, 8: int8). loftq_iter: how many times quantisation and the
    rank-r fit of the residual alternate (>= 1).
    """

    loftq_bits: int = field(default=4,
                            metadata={"help": "Bits of the quantised base weight: 4 (NF4) or 8 (int8)."})
    loftq_iter: int = field(default=1, metadata={"help": "Rounds of quantise / low-rank fit (>= 1)."})


def _as_dict(loftq_config) -> dict:
    """The settings as a dict with every field present (a file may omit some; unknown keys are dropped)."""
    return asdict(coerce(loftq_config, LoftQConfig, "loftq_config"))


def _check_settings(settings: dict) -> None:
    bits, rounds = settings["loftq_bits"], settings["loftq_iter"]
    if bits not in LOFTQ_QUANTISERS:
        raise ValueError(
            f"loftq_config.loftq_bits={bits!r} is not supported; use one of {sorted(LOFTQ_QUANTISERS)} "
            f"({', '.join(f'{b}: {q}' for b, q in LOFTQ_QUANTISERS.items())}), as HF PEFT 0.21."
        )
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"loftq_config.loftq_iter must be an integer >= 1, got {rounds!r}.")


def _warn_scaling(config) -> None:
    scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
    if scaling != 1 or config.alpha_pattern or config.rank_pattern:
        logger.warning(
            "init_lora_weights='loftq' sets B @ A to the quantisation residual W - Q itself, without "
            "dividing by the LoRA scaling (as HF PEFT), so Q + scaling * B @ A approximates W only where "
            "scaling == 1; here lora_alpha / r = %s (rank_pattern/alpha_pattern: %s). Set lora_alpha = r (no "
            "rsLoRA) for LoftQ's fit.", scaling, bool(config.alpha_pattern or config.rank_pattern))


def check_config(config) -> None:
    """LoraConfig's `loftq_config`, checked as HF PEFT does: required (non-empty) with
    init_lora_weights='loftq', stored as a dict; set without 'loftq' it is cleared with a warning. Bits and
    rounds are checked here already (HF PEFT only refuses them when the layers are built).
    """
    given = config.loftq_config
    if config.init_lora_weights != "loftq":
        if given:
            logger.warning("loftq_config is ignored (and cleared) unless init_lora_weights='loftq'.")
        config.loftq_config = {}
        return
    if not given:
        raise ValueError(
            "init_lora_weights='loftq' needs loftq_config: pass loftq_config=LoftQConfig(loftq_bits=4, "
            "loftq_iter=1) (fastpeft.LoftQConfig)."
        )
    settings = _as_dict(given)
    _check_settings(settings)
    config.loftq_config = settings
    _warn_scaling(config)


register_check("loftq_config", check_config)
