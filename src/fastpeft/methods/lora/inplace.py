"""Unmerged LoRA Linear output without autograd: the sum formed in place, in tensors this forward created.

`result + s * B(A(x))` out of place allocates and passes the (tokens x out) output several times: B's
float32 output, `* s`, the promoted sum and the cast back (one gate_proj-sized layer, 2048 tokens,
2048 -> 8192, bf16 base, fp32 r=16 adapter: LoRA adds ~108 ms to a 65 ms base matmul on one CPU thread,
almost all in those passes). With nothing recorded for backward the same values can be formed in place,
rounding exactly as the out-of-place order (HF PEFT's): `t.add_(u)` computes in the promoted dtype and
rounds once into `t`, and IEEE addition is commutative: only the tensor written into changes, no value.

A tensor is written into only when this forward made it and nobody else can hold it: LoRA's own A / B outputs
(no forward hooks, no replaced `forward`), and the base layer's output only when the base is a plain
`nn.Linear` / transformers `Conv1D` with no hooks (a quantised, wrapped or hooked base may return or keep a
shared tensor). Anything else (variants, subclasses, active dropout, torch.compile) takes the plain path.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _module_mod

_FOLD_DTYPES = (torch.float32, torch.bfloat16)  # float32's exponent range: 2**k scaling stays exact


def _fresh_base_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


_FRESH_BASES = _fresh_base_types()


def _unhooked(module: nn.Module) -> bool:
    """No forward hook can keep the module's output, and its forward is the class's own."""
    return not module._forward_hooks and "forward" not in module.__dict__


def applies(layer, result: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether autograd records nothing here (inference, generate, prefill under no_grad)."""
    if torch.compiler.is_compiling() or _module_mod._global_forward_hooks:
        return False
    if not torch.is_grad_enabled():
        return True
    return not (result.requires_grad or x.requires_grad
                or any(p.requires_grad for p in layer.lora_A.parameters())
                or any(p.requires_grad for p in layer.lora_B.parameters()))


def _base_output_is_fresh(layer, result: torch.Tensor, x: torch.Tensor) -> bool:
    base = layer.get_base_layer()
    return type(base) in _FRESH_BASES and _unhooked(base) and result is not x


def _power_of_two(s: float) -> bool:
    return s > 0 and math.isfinite(s) and math.frexp(s)[0] == 0.5


def _own_output(layer, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """s * B(A(dropout(x))) in a tensor nobody else holds, or None where the plain path must compute it."""
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if dropout.training or not (_unhooked(a) and _unhooked(b)):
        return None
    s = layer.scaling[name]
    h = a(dropout(layer.cast_input(x, a.weight.dtype)))
    # s = 2**k with no B bias: scaling the (tokens x r) input scales every product and partial sum of B's
    # matmul exactly, so B(s h) == s B(h) bit for bit and the pass over (tokens x out) goes away
    fold = s != 1 and b.bias is None and h.dtype in _FOLD_DTYPES and _power_of_two(s)
    if fold:
        h.mul_(s)
    out = b(h)
    if s != 1 and not fold:  # s == 1: `* 1.0` changes no value
        out.mul_(s)
    return out


def add_adapters(layer, result: torch.Tensor, x: torch.Tensor, names) -> torch.Tensor:
    """`layer.add_adapters` for the no-grad case, bit for bit the same values."""
    out_dtype, own, variants = result.dtype, layer.lora_A, layer.lora_variant
    todo = [n for n in names if n in own]
    running, owned = result, _base_output_is_fresh(layer, result, x)
    for i, name in enumerate(todo):
        variant = variants.get(name) if variants else None
        lora = None if variant is not None else _own_output(layer, name, x)
        if lora is None:
            running = (running + layer.adapter_output(name, x) if variant is None
                       else variant.add_to(layer, name, x, running))
            owned = False
            continue
        common = torch.result_type(running, lora)
        last = i == len(todo) - 1
        if lora.shape != running.shape:  # broadcasting: out of place
            running, owned = running + lora, True
        elif owned and (running.dtype == common or (last and running.dtype == out_dtype)):
            running.add_(lora)  # the last add rounds once into the output dtype, as `(r + l).to(out)`
        elif lora.dtype == common:
            running, owned = lora.add_(running), True
        else:
            running, owned = running + lora, True
    return running if running.dtype == out_dtype else running.to(out_dtype)
