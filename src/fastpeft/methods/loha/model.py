"""`LoHaModel`: the LoHa tuner (Linear, Conv1d and Conv2d targets; defaults in ../_shared/lycoris.py)."""

from __future__ import annotations

from .._shared.lycoris import LycorisTuner, lycoris_dispatch
from . import layer


class LoHaModel(LycorisTuner):
    dispatch = lycoris_dispatch("LoHa", layer.Linear, layer.Conv1d, layer.Conv2d)
    method_name = "LoHa"
    layer_family = layer.LoHaLayer
