"""`LoKrModel`: the LoKr tuner (Linear, Conv1d and Conv2d targets; defaults in ../_shared/lycoris.py)."""

from __future__ import annotations

from .._shared.lycoris import LycorisTuner, lycoris_dispatch
from . import layer


class LoKrModel(LycorisTuner):
    dispatch = lycoris_dispatch("LoKr", layer.Linear, layer.Conv1d, layer.Conv2d)
    method_name = "LoKr"
    layer_family = layer.LoKrLayer
