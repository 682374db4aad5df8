"""LoHa layers: dW is the elementwise (Hadamard) product of two low-rank matrices, each rebuilt from two
factors (or, for conv kernels with `use_effective_conv2d`, from a CP core and two factors)."""

from __future__ import annotations

import torch

from .._shared.lycoris import Geometry, LycorisLayer, cp_weight


class LoHaLayer(LycorisLayer):
    # same attribute names as HF PEFT, so file keys match; order = HF's initialisation order
    adapter_param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    adapter_layer_names = adapter_param_names  # HF PEFT's name (diffusers' layerwise casting reads it)
    # init_weights=True: one factor of the second product is zero, so dW = 0 at the start
    ZERO_INIT = {True: ("hada_w2_b",), False: ()}

    def scales_rank_dropout(self, config) -> bool:
        return True

    def create_parameters(self, name: str, r: int, geo: Geometry, config) -> None:
        if geo.effective:  # out / in factors are (r, dim); each term is a CP-rebuilt kernel
            for pair in ("1", "2"):
                self.add_parameter(f"hada_t{pair}", name, r, r, *geo.cp_kernel)
                self.add_parameter(f"hada_w{pair}_a", name, r, geo.out)
                self.add_parameter(f"hada_w{pair}_b", name, r, geo.inp)
            return
        for pair in ("1", "2"):  # matrix form: (out, r) @ (r, in * prod(kernel))
            self.add_parameter(f"hada_w{pair}_a", name, geo.out, r)
            self.add_parameter(f"hada_w{pair}_b", name, r, geo.flat_in)

    def _term(self, name: str, pair: str) -> torch.Tensor:
        w_a = getattr(self, f"hada_w{pair}_a")[name]
        w_b = getattr(self, f"hada_w{pair}_b")[name]
        cores = getattr(self, f"hada_t{pair}")
        return cp_weight(cores[name], w_a, w_b) if name in cores else w_a @ w_b

    def full_delta(self, name: str) -> torch.Tensor:
        return self._term(name, "1") * self._term(name, "2") * self.scaling[name]


class Linear(LoHaLayer):
    """LoHa on nn.Linear."""


class Conv1d(LoHaLayer):
    """LoHa on nn.Conv1d."""


class Conv2d(LoHaLayer):
    """LoHa on nn.Conv2d."""
