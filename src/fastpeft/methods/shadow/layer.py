"""`ShadowLayer`: wraps one decoder block; injects the shadow state into its input and advances the state
from its output (ShadowPEFT, paper Sections 3.2-3.3).

Between the first and the last wrapped block the decoder loop carries a `ShadowCarrier` (base hidden states
and shadow state, both (batch, seq, d)) in place of the hidden-states tensor; the first block builds it from
the seed state s0 the tuner computed for this forward, the last one hands the plain tensor back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.layer import AdapterLayer


class ShadowCarrier:
    """The pair the decoder loop passes between wrapped blocks: base `hidden` and `shadow` states."""

    def __init__(self, hidden: torch.Tensor, shadow: torch.Tensor) -> None:
        self.hidden = hidden
        self.shadow = shadow


class ShadowRun:
    """Per-forward state the tuner shares with its layers (a plain object, not a module): the seed s0 of the
    running forward (None: the shadow path is off for it)."""

    def __init__(self) -> None:
        self.seed: torch.Tensor | None = None


def block_hidden(out: Any) -> torch.Tensor:
    """The hidden-states tensor in a decoder block's return value (tensor, tuple or model output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    for name in ("hidden_states", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"ShadowPEFT cannot read the hidden states from a decoder block returning "
                    f"{type(out).__name__}; wrap blocks that return a tensor or a tuple.")


class ShadowLayer(AdapterLayer):
    """One decoder block plus, per adapter, the injection bottleneck and the gated state update."""

    adapter_param_names = ("shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate")
    additive = False
    # as HF PEFT's files: the adapter's part of these keys is always "default", whatever its name
    file_adapter_label = "default"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, hidden_size: int) -> None:
        super().__init__(base_layer)
        self.hidden_size = int(hidden_size)  # d: the shadow state lives at the base width (Eq. 2 needs it)
        self.shadow_r: dict[str, int] = {}
        self.shadow_alpha: dict[str, float] = {}
        self.shadow_down = nn.ModuleDict()
        self.shadow_up = nn.ModuleDict()
        self.shadow_dropout = nn.ModuleDict()
        self.shadow_update_transform = nn.ModuleDict()
        self.shadow_update_gate = nn.ModuleDict()
        self.__dict__["shadow_run"] = None  # set by the tuner
        self.__dict__["shadow_entry"] = False
        self.__dict__["shadow_exit"] = False
        self.update_layer(adapter_name, config)
        self._active_adapters = [adapter_name]

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        d, r = self.hidden_size, config.r
        width = config.update_hidden_size or r
        self.shadow_r[adapter_name] = r
        self.shadow_alpha[adapter_name] = config.shadow_alpha
        # built in HF PEFT's order, so that one seed gives both libraries the same initial values
        self.shadow_down[adapter_name] = nn.Linear(d, r, bias=False)
        self.shadow_up[adapter_name] = nn.Linear(r, d, bias=False)
        self.shadow_dropout[adapter_name] = (nn.Dropout(p=config.shadow_dropout) if config.shadow_dropout
                                             else nn.Identity())
        if config.init_weights:  # W_up = 0: the injection starts as a no-op (LoRA's B = 0)
            nn.init.zeros_(self.shadow_up[adapter_name].weight)
        # T and G of Eq. 5-6: two-layer MLPs d -> width -> d
        self.shadow_update_transform[adapter_name] = nn.Sequential(
            nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        self.shadow_update_gate[adapter_name] = nn.Sequential(
            nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))

    # ------------------------------------------------------------------ forward
    def forward(self, x, *args, **kwargs):
        if self.call_adapter_names(kwargs) is not None:
            raise ValueError("ShadowPEFT does not serve mixed-adapter batches (adapter_names=[...]): the "
                             "shadow state runs through every block with one adapter. Use set_adapter per "
                             "batch.")
        run = self.__dict__["shadow_run"]
        if not isinstance(x, ShadowCarrier):
            if not (self.shadow_entry and run is not None and run.seed is not None):
                return self.base_layer(x, *args, **kwargs)
            x = self._carrier(x, run.seed)
        name = self._active_adapters[0]
        injected = self.shadow_inject(x.hidden, x.shadow, name)  # Eq. 2-4
        out = self.base_layer(injected, *args, **kwargs)
        hidden = block_hidden(out)
        shadow = self.shadow_update(hidden, x.shadow, name)  # Eq. 5-7
        result = hidden if self.shadow_exit else ShadowCarrier(hidden, shadow)
        return (result, *out[1:]) if isinstance(out, tuple) else result

    @staticmethod
    def _carrier(hidden: torch.Tensor, seed: torch.Tensor) -> ShadowCarrier:
        if hidden.shape[:-1] != seed.shape[:-1]:
            raise ValueError(
                f"The shadow state has (batch, seq) {tuple(seed.shape[:-1])} but the first wrapped block "
                f"gets {tuple(hidden.shape[:-1])}. With a KV cache, pass back the ShadowCache a previous "
                "forward returned, so that the shadow backbone sees the same new tokens as the base model.")
        return ShadowCarrier(hidden, seed)

    def shadow_inject(self, hidden: torch.Tensor, shadow: torch.Tensor, name: str) -> torch.Tensor:
        """h + alpha * W_up(dropout(W_down(h - s))): the adapter runs in its own dtype (fp32 adapters on a
        half-precision base), the correction is added in the base dtype."""
        down = self.shadow_down[name]
        delta = (hidden - shadow).to(down.weight.dtype)  # Eq. 2
        delta = self.shadow_up[name](down(self.shadow_dropout[name](delta)))  # Eq. 3
        return hidden + (self.shadow_alpha[name] * delta).to(hidden.dtype)  # Eq. 4

    def shadow_update(self, hidden: torch.Tensor, shadow: torch.Tensor, name: str) -> torch.Tensor:
        """s' = (1 - g) * s + g * T(h), g = sigmoid(G(h)), in the adapter dtype; returned in the state's."""
        transform = self.shadow_update_transform[name]
        compute = transform[0].weight.dtype
        h = hidden.to(compute)
        gate = torch.sigmoid(self.shadow_update_gate[name](h))  # Eq. 6
        new = (1.0 - gate) * shadow.to(compute) + gate * transform(h)  # Eq. 5, 7
        return new.to(shadow.dtype)

    # ------------------------------------------------------------------ not a weight delta
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "ShadowPEFT cannot be merged into the base weights: its change depends on the input (a shadow "
            "state that evolves through the layers), not a fixed weight delta. Use unload() for the plain "
            "base model, or unload_shadow() for the standalone shadow network.")

    def unmerge(self) -> None:
        if self.merged_adapters:  # never reached: merging is refused
            raise NotImplementedError("ShadowPEFT adapters are never merged.")

    def __getattr__(self, name: str):
        # decoder loops read attributes of the block they call (e.g. `attention_type`): the wrapped block's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)
