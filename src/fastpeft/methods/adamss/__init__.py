"""AdaMSS: adaptive multi-subspace fine-tuning, per-cluster low-rank updates in each weight's top singular
subspace, with ASA (adaptive subspace allocation) pruning subspaces by importance during training."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import AdamssConfig
from .layer import AdamssLayer, Linear
from .model import AdamssModel

register(MethodSpec(peft_type=PeftType.ADAMSS, config_cls=AdamssConfig, prefix="adamss_",
                    tuner_cls=AdamssModel))


def __getattr__(name):
    if name == "AdamssAsaCallback":  # needs transformers: imported on first use only
        from .callback import AdamssAsaCallback

        return AdamssAsaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdamssConfig", "AdamssLayer", "AdamssModel", "Linear"]
