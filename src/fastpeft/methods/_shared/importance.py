"""Importance-driven pruning pieces for methods that shrink their trained capacity during training.

The sensitivity of a tensor entry is I = |w * dL/dw| (a first-order estimate of the loss change if the entry
were removed). It is smoothed over steps (an EMA, `beta_ipt`) and its deviation from that average tracked as
an uncertainty (another EMA, `beta_unc`); the score of an entry is their product (Zhang et al., 2022,
"PLATON", https://arxiv.org/abs/2206.12562). The budget of kept units decays polynomially from all of them to
a target between two steps.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def smooth_importance(param: torch.Tensor, avg: torch.Tensor, unc: torch.Tensor, beta_ipt: float,
                      beta_unc: float, deviation_first: bool) -> None:
    """Fold this step's |w * grad| of `param` into `avg` (sensitivity) and `unc` (uncertainty), in place.

    `deviation_first`: the deviation is measured against the average from before this step (then the
    average is updated); otherwise against the updated average. Methods differ in that order.
    """
    ipt = (param * param.grad).abs()
    if deviation_first:
        unc.mul_(beta_unc).add_((ipt - avg).abs(), alpha=1 - beta_unc)
        avg.mul_(beta_ipt).add_(ipt, alpha=1 - beta_ipt)
    else:
        avg.mul_(beta_ipt).add_(ipt, alpha=1 - beta_ipt)
        unc.mul_(beta_unc).add_((ipt - avg).abs(), alpha=1 - beta_unc)


def decayed_budget(step: int, start: int, end: int, total: int, target: int, exponent: float) -> int:
    """Units kept at `step`: `total` before `start`, `target` after `end`, in between
    target + (total - target) * (1 - progress) ** exponent, rounded down."""
    if step <= start:
        left = 1.0
    elif step >= end:
        left = 0.0
    else:
        left = 1.0 - (step - start) / (end - start)
    return int(target + (total - target) * left ** exponent)
