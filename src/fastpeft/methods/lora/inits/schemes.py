"""LoRA initialisation schemes, as a table: `init_lora_weights` value -> function(layer, adapter_name).

The config's accepted values are this table's keys plus its parameterised families (`pissa_niter_K`).
True, "gaussian" and "orthogonal" leave the layer's output unchanged at init; PiSSA and OLoRA move the top
of the base weight into the adapter and leave the residual in the base, so base + adapter is unchanged too.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from ..config import PISSA_NITER, init_rewrites_base
from ..subconfig import register_check
from .common import base_weight, check_decomposable, is_transposed, kaiming, set_factors, zero_product
from .corda import corda_init
from .loftq import loftq_init
from .lora_ga import lora_ga_init
from .mica import mica_init


def _gaussian(a, r: int) -> None:
    nn.init.normal_(a, std=1 / r)


def _init_random(layer, name: str) -> None:
    """init_lora_weights=False: keep the random init of both factors (not identity; for tests/debugging)."""


def _eva_deferred(layer, name: str) -> None:
    """init_lora_weights='eva': B zero, A kept as built; initialize_lora_eva_weights (eva.py) writes A
    later."""
    nn.init.zeros_(layer.lora_weights(name)[1])


def _lora_ga(layer, name: str, config) -> None:
    """init_lora_weights='lora_ga': from preprocess_loraga's gradients (lora_ga.py)."""
    lora_ga_init(layer, name, config)


_lora_ga.takes_config = True  # lora_ga_config (direction, scale) is read from the LoraConfig


def _loftq(layer, name: str, config) -> None:
    """init_lora_weights='loftq': quantised base, adapter fitted to the error (loftq.py)."""
    loftq_init(layer, name, config)


_loftq.takes_config = True  # SchemeTable.run passes the LoraConfig (loftq_config holds bits and rounds)


# ---------------------------------------------------------------------------------------------- schemes
def _pissa(layer, name: str, niter: int | None = None) -> None:
    """PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"): the
    adapter holds the top-r singular triplets of W, split as B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T,
    and the base keeps W - s B A. `niter` set: the randomized SVD of Halko et al. (torch.svd_lowrank) with
    that many iterations.
    """
    scheme = "pissa" if niter is None else f"pissa_niter_{niter}"
    weight = base_weight(layer, scheme)
    check_decomposable(layer, name, weight, scheme)
    dtype, transposed, r, s = weight.dtype, is_transposed(layer), layer.r[name], layer.scaling[name]
    w = weight.to(torch.float32)
    w = w.T if transposed else w  # (out, in)
    if niter is None:
        u, sv, vh = torch.linalg.svd(w.data, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], sv[:r] / s, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w.data, r, niter=niter)
        s_r, vh_r = s_r / s, v_r.t()
    a = torch.diag(torch.sqrt(s_r)) @ vh_r
    b = u_r @ torch.diag(torch.sqrt(s_r))
    set_factors(layer, name, a, b, dtype)
    residual = (w.data - s * b @ a).to(dtype)
    layer.get_base_layer().weight.data = residual.T if transposed else residual


def _olora(layer, name: str) -> None:
    """OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"): W = QR,
    B = Q[:, :r] (orthonormal columns), A = R[:r]; the base keeps W - s B A.
    """
    weight = base_weight(layer, "olora")
    check_decomposable(layer, name, weight, "olora")
    dtype, transposed, r, s = weight.dtype, is_transposed(layer), layer.r[name], layer.scaling[name]
    w = weight.to(torch.float32)
    # (out, in); HF PEFT 0.21 skips this for Conv1D and builds mis-shaped factors
    w = w.T if transposed else w
    q, rr = torch.linalg.qr(w.data)
    b, a = q[:, :r], rr[:r]
    set_factors(layer, name, a, b, dtype)
    residual = (w.data - s * b @ a).to(dtype)
    layer.get_base_layer().weight.data = residual.T if transposed else residual


@torch.no_grad()
def _orthogonal(layer, name: str) -> None:
    """Orthogonal init (https://datta0.github.io/posts/rethink-lora-init/): A's rows come from the even rows
    of a random orthogonal Q, B's columns from the odd ones, so B @ A = 0 at init while neither factor is
    zero.
    """
    weight = base_weight(layer, "orthogonal")
    r = layer.r[name]
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(layer.in_features, r // 2).mm(q[0::2]).T / 10.0
    b = torch.randn(r // 2, layer.out_features).T.mm(q[1::2]) / 10.0
    set_factors(layer, name, a, b, weight.dtype)


# ---------------------------------------------------------------------------------------------- the table
class SchemeTable(dict):
    """The scheme table; a miss is looked up in `families` (full-match pattern -> factory(match)
    -> function)."""

    def __init__(self, fixed: dict, families: dict[str, tuple[str, object]]) -> None:
        super().__init__(fixed)
        self.families = {re.compile(p): (shown, factory) for p, (shown, factory) in families.items()}

    def __missing__(self, key):
        if isinstance(key, str):
            for pattern, (_, factory) in self.families.items():
                match = pattern.fullmatch(key)
                if match:
                    return factory(match)
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except (KeyError, TypeError):
            return False
        return True

    def run(self, layer, name: str, config) -> None:
        """Apply `config.init_lora_weights`' scheme to adapter `name`; schemes marked `takes_config` get
        config."""
        scheme = self[config.init_lora_weights]
        if layer.lora_weights(name)[0].is_meta:  # low_cpu_mem_usage: the factors' values come from the file
            if init_rewrites_base(config.init_lora_weights):
                raise ValueError(
                    f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight from the "
                    "adapter's initial values, which low_cpu_mem_usage=True does not compute. Load with "
                    "low_cpu_mem_usage=False."
                )
            return
        scheme(layer, name, *((config,) if getattr(scheme, "takes_config", False) else ()))

    def names(self) -> list:
        """Accepted values, families shown in their documented form (for error messages)."""
        return [*self, *(shown for shown, _ in self.families.values())]


INIT_SCHEMES = SchemeTable(
    {
        True: partial(zero_product, init_a=kaiming),
        False: _init_random,
        "gaussian": partial(zero_product, init_a=_gaussian),
        "orthogonal": _orthogonal,
        "pissa": _pissa,
        "olora": _olora,
        "eva": _eva_deferred,
        "corda": corda_init,  # from preprocess_corda's decompositions (corda.py)
        "lora_ga": _lora_ga,
        "loftq": _loftq,
        "mica": mica_init,  # MiCA (mica.py): B from the minor singular vectors, frozen; its variant row too
    },
    families={PISSA_NITER: ("pissa_niter_K (K >= 1 subspace iterations)",
                            lambda m: partial(_pissa, niter=int(m.group(1))))},
)

# schemes that leave lora_B's bias at zero, hence allow lora_bias=True
LORA_BIAS_SCHEMES = (True, False, "gaussian")


def check_config(config) -> None:
    """LoraConfig's init_lora_weights: a scheme of the table; lora_bias only with one zeroing that bias."""
    if config.init_lora_weights not in INIT_SCHEMES:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} is not supported by fastpeft; "
            f"choose one of {INIT_SCHEMES.names()}."
        )
    if config.lora_bias and config.init_lora_weights not in LORA_BIAS_SCHEMES:
        raise ValueError(
            f"lora_bias=True needs init_lora_weights in {list(LORA_BIAS_SCHEMES)} (which start lora_B's bias "
            f"at zero), got {config.init_lora_weights!r}."
        )


register_check("init_lora_weights", check_config)
