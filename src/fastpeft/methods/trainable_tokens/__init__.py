"""Trainable tokens: train a few embedding rows (by token id) instead of the whole embedding matrix."""

from ...registry import MethodSpec, register
from ...types import PeftType
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer, TrainableTokensWrapper
from .model import TrainableTokensModel

register(MethodSpec(peft_type=PeftType.TRAINABLE_TOKENS, config_cls=TrainableTokensConfig,
                    prefix="trainable_tokens_", tuner_cls=TrainableTokensModel))

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel", "TrainableTokensWrapper"]
