"""LoRA initialisation schemes, as a table: `init_lora_weights` value -> function(layer, adapter_name).

The config's accepted values are this table's keys plus its parameterised families (`pissa_niter_K`).
True, "gaussian" and "orthogonal" leave the layer's output unchanged at init; PiSSA and OLoRA move the top
of the base weight into the adapter and leave the residual in the base, so base + adapter is unchanged too.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import nn

from .mica import mica_init

HALF_OR_FULL = (torch.float32, torch.float16, torch.bfloat16)


def _zero_product(layer, name: str, init_a) -> None:
    """Make B @ A zero at init: B zero and A drawn by `init_a` (embeddings: A zero, B normal, as HF PEFT)."""
    a, b = layer.lora_weights(name)
    if layer.is_embedding:
        nn.init.zeros_(a)
        nn.init.normal_(b)
    else:
        init_a(a, layer.r[name])
        nn.init.zeros_(b)
    bias = layer.lora_B_bias(name)
    if bias is not None:
        nn.init.zeros_(bias)


def _kaiming(a, r: int) -> None:
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init


def _gaussian(a, r: int) -> None:
    nn.init.normal_(a, std=1 / r)


def _init_random(layer, name: str) -> None:
    """init_lora_weights=False: keep the random init of both factors (not identity; for tests/debugging)."""


def _eva_deferred(layer, name: str) -> None:
    """init_lora_weights='eva': B zero, A kept as built; initialize_lora_eva_weights (eva.py) writes A later."""
    nn.init.zeros_(layer.lora_weights(name)[1])


def _corda(layer, name: str) -> None:
    """init_lora_weights='corda': from preprocess_corda's decompositions (corda.py; imported here lazily)."""
    from .corda import corda_init

    corda_init(layer, name)


def _lora_ga(layer, name: str, config) -> None:
    """init_lora_weights='lora_ga': from preprocess_loraga's gradients (lora_ga.py; imported here lazily)."""
    from .lora_ga import lora_ga_init

    lora_ga_init(layer, name, config)


_lora_ga.takes_config = True  # lora_ga_config (direction, scale) is read from the LoraConfig


def _loftq(layer, name: str, config) -> None:
    """init_lora_weights='loftq': quantised base, adapter fitted to the error (loftq.py; imported here lazily)."""
    from .loftq import loftq_init

    loftq_init(layer, name, config)


_loftq.takes_config = True  # SchemeTable.run passes the LoraConfig (loftq_config holds bits and rounds)


# ---------------------------------------------------------------------------------------------- helpers
def _base_weight(layer, scheme: str) -> torch.Tensor:
    """The 2-D weight of a linear (or Conv1D) base layer; other layer kinds are refused before any change."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    # MHA's out_proj is a NonDynamicallyQuantizableLinear whose LoRA delta MHA applies twice (layer.py)
    inside_mha = isinstance(base, nn.modules.linear.NonDynamicallyQuantizableLinear)
    if layer.is_embedding or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or inside_mha:
        raise ValueError(
            f"init_lora_weights={scheme!r} works on linear layers (nn.Linear, transformers' Conv1D) only, not on "
            f"{type(base).__name__}. Leave such layers out (exclude_modules) or give them a separate adapter "
            "with init_lora_weights=True."
        )
    return weight


def _transposed(layer) -> bool:
    """Whether the base weight is stored (in, out) like GPT-2's Conv1D (fan_in_fan_out)."""
    from .model import is_conv1d  # model imports layer imports this module

    return bool(layer.fan_in_fan_out) or is_conv1d(layer.get_base_layer())


def _check_decomposable(layer, name: str, weight: torch.Tensor, scheme: str) -> None:
    if weight.dtype not in HALF_OR_FULL:
        raise TypeError(
            f"init_lora_weights={scheme!r} needs a float32, float16 or bfloat16 base weight, got {weight.dtype}. "
            "Initialise on the unquantised model, then quantise the residual model."
        )
    r, limit = layer.r[name], min(weight.shape)
    if r > limit:
        raise ValueError(
            f"init_lora_weights={scheme!r} needs r <= min(in_features, out_features) = {limit} for a layer with "
            f"weight shape {tuple(weight.shape)}, got r={r}; lower r (rank_pattern can set it for this layer)."
        )


def _set_factors(layer, name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Factors stored in the base weight's dtype first (as HF PEFT; autocast may widen them again later)."""
    weight_a, weight_b = layer.lora_weights(name)
    weight_a.data, weight_b.data = a.contiguous().to(dtype), b.contiguous().to(dtype)


# ---------------------------------------------------------------------------------------------- schemes
def _pissa(layer, name: str, niter: int | None = None) -> None:
    """PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"): the adapter
    holds the top-r singular triplets of W, split as B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, and the base
    keeps W - s B A. `niter` set: the randomized SVD of Halko et al. (torch.svd_lowrank) with that many iterations.
    """
    scheme = "pissa" if niter is None else f"pissa_niter_{niter}"
    weight = _base_weight(layer, scheme)
    _check_decomposable(layer, name, weight, scheme)
    dtype, transposed, r, s = weight.dtype, _transposed(layer), layer.r[name], layer.scaling[name]
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
    _set_factors(layer, name, a, b, dtype)
    residual = (w.data - s * b @ a).to(dtype)
    layer.get_base_layer().weight.data = residual.T if transposed else residual


def _olora(layer, name: str) -> None:
    """OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"): W = QR,
    B = Q[:, :r] (orthonormal columns), A = R[:r]; the base keeps W - s B A.
    """
    weight = _base_weight(layer, "olora")
    _check_decomposable(layer, name, weight, "olora")
    dtype, transposed, r, s = weight.dtype, _transposed(layer), layer.r[name], layer.scaling[name]
    w = weight.to(torch.float32)
    w = w.T if transposed else w  # (out, in); HF PEFT 0.21 skips this for Conv1D and builds mis-shaped factors
    q, rr = torch.linalg.qr(w.data)
    b, a = q[:, :r], rr[:r]
    _set_factors(layer, name, a, b, dtype)
    residual = (w.data - s * b @ a).to(dtype)
    layer.get_base_layer().weight.data = residual.T if transposed else residual


@torch.no_grad()
def _orthogonal(layer, name: str) -> None:
    """Orthogonal init (https://datta0.github.io/posts/rethink-lora-init/): A's rows come from the even rows of a
    random orthogonal Q, B's columns from the odd ones, so B @ A = 0 at init while neither factor is zero.
    """
    weight = _base_weight(layer, "orthogonal")
    r = layer.r[name]
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(layer.in_features, r // 2).mm(q[0::2]).T / 10.0
    b = torch.randn(r // 2, layer.out_features).T.mm(q[1::2]) / 10.0
    _set_factors(layer, name, a, b, weight.dtype)


# ---------------------------------------------------------------------------------------------- the table
class SchemeTable(dict):
    """The scheme table; a miss is looked up in `families` (full-match pattern -> factory(match) -> function)."""

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
        """Apply `config.init_lora_weights`' scheme to adapter `name`; schemes marked `takes_config` get config."""
        scheme = self[config.init_lora_weights]
        if layer.lora_weights(name)[0].is_meta:  # low_cpu_mem_usage: the factors' values come from the file
            if modifies_base(config.init_lora_weights) or config.init_lora_weights == "loftq":
                raise ValueError(
                    f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight from the adapter's "
                    "initial values, which low_cpu_mem_usage=True does not compute. Load with "
                    "low_cpu_mem_usage=False."
                )
            return
        scheme(layer, name, *((config,) if getattr(scheme, "takes_config", False) else ()))

    def names(self) -> list:
        """Accepted values, families shown in their documented form (for error messages)."""
        return [*self, *(shown for shown, _ in self.families.values())]


INIT_SCHEMES = SchemeTable(
    {
        True: partial(_zero_product, init_a=_kaiming),
        False: _init_random,
        "gaussian": partial(_zero_product, init_a=_gaussian),
        "orthogonal": _orthogonal,
        "pissa": _pissa,
        "olora": _olora,
        "eva": _eva_deferred,
        "corda": _corda,
        "lora_ga": _lora_ga,
        "loftq": _loftq,
        "mica": mica_init,  # MiCA (mica.py): B from the minor singular vectors, frozen; its variant row too
    },
    families={r"pissa_niter_([1-9][0-9]*)": ("pissa_niter_K (K >= 1 subspace iterations)",
                                             lambda m: partial(_pissa, niter=int(m.group(1))))},
)

# schemes that leave lora_B's bias at zero, hence allow lora_bias=True
LORA_BIAS_SCHEMES = (True, False, "gaussian")

# schemes that subtract the initial adapter from the base weight (post-training conversion applies to them)
BASE_MODIFYING = ("pissa", "olora", "corda", "lora_ga")


def modifies_base(value) -> bool:
    """Whether `init_lora_weights=value` rewrites the base weight (PiSSA, pissa_niter_K, OLoRA, CorDA, LoRA-GA)."""
    return isinstance(value, str) and value in INIT_SCHEMES and value.split("_niter_")[0] in BASE_MODIFYING
