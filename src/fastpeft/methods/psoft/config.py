"""`PsoftConfig`: every field, default and check of HF PEFT 0.21.2's PSOFT config, so files round-trip."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig
from .._shared.common import check_choice, check_layer_selection, check_positive_ints, lists_to_sets

AB_INITS = ("pissa_init", "psoft_init")
SVD_BACKENDS = ("full", "lowrank")


@dataclass
class PsoftConfig(PeftConfig):
    """PSOFT: orthogonal fine-tuning inside the principal subspace of each weight (OpenReview,
    https://openreview.net/forum?id=FSHrinMArK).

    A (r, in) and B (out, r) come from the top-r SVD of the frozen weight W and stay frozen (rebuilt from W
    when an adapter is loaded, never saved); only an r x r matrix R (a Cayley rotation, optionally with
    trained scales on both sides) trains. The update is dW = scaling * B (R - I) A, zero while R = I.
    """

    r: int = field(default=32, metadata={
        "size": "dim",
        "help": "Rank of the principal subspace: R is r x r. At most min(in_features, out_features) of "
                "every adapted layer."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "nn.Linear modules to adapt: names (or dotted suffixes), a full-match regex or 'all-linear'; "
                "default: the model type's attention projections (LoRA's table)."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    psoft_alpha: int = field(default=32, metadata={
        "help": "Scale numerator as in LoRA (scaling = psoft_alpha / r); B is divided by it at init, so it "
                "sets the step size of R, not the initial update."})
    psoft_dropout: float = field(default=0.0, metadata={
        "help": "Dropout probability on the adapter path's input (training mode only)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Weights stored (in, out); PSOFT adapts nn.Linear only, so it is turned off (warned)."})
    ab_svd_init: Literal["psoft_init", "pissa_init"] = field(default="psoft_init", metadata={
        "help": "How the SVD factors split: 'psoft_init' A = V_r^T (orthonormal rows), B = U_r S_r; "
                "'pissa_init' A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r) (PiSSA's symmetric split)."})
    psoft_svd: Literal["full", "lowrank"] = field(default="full", metadata={
        "help": "SVD used at init: 'full' (torch.linalg.svd) or 'lowrank' (torch.svd_lowrank, randomised)."})
    psoft_svd_lowrank_niter: int = field(default=10, metadata={
        "size": "dim", "help": "Power iterations of torch.svd_lowrank (psoft_svd='lowrank' only)."})
    random_seed: int = field(default=0, metadata={
        "help": "Seed of the randomised SVD (psoft_svd='lowrank' only), so that a loaded adapter rebuilds "
                "the A and B it was trained with; the global RNG is left alone."})
    psoft_orth: bool = field(default=True, metadata={
        "help": "True: R is the Cayley transform of a trained skew-symmetric matrix (orthogonal); False: R "
                "is a free r x r matrix."})
    psoft_mag_b: bool = field(default=True, metadata={
        "help": "Train a per-row scale on R's output side (diag(b) R)."})
    psoft_mag_a: bool = field(default=True, metadata={
        "help": "Train a per-column scale on R's input side (R diag(a))."})
    use_cayley_neumann: bool = field(default=False, metadata={
        "help": "Approximate the Cayley transform by a truncated Neumann series (matmuls only) instead of "
                "a linear solve."})
    num_cayley_neumann_terms: int = field(default=5, metadata={
        "size": "dim", "help": "Terms of the Neumann series (use_cayley_neumann=True only)."})
    cayley_neumann_eps: float | None = field(default=None, metadata={
        "help": "With use_cayley_neumann: a bound in (0, 1) on the Frobenius norm of the skew matrix, which "
                "is scaled down past it so that the series converges; None: no bound."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: R = I (no change at start); False: a random R (normal, std 0.1), for tests."})
    layers_to_transform: list[int] | int | None = field(default=None,
                                                        metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        lists_to_sets(self)
        check_layer_selection(self, "PsoftConfig", regex_targets=True)
        check_positive_ints(self, "PsoftConfig", ("r",))
        check_choice("PsoftConfig", "ab_svd_init", self.ab_svd_init, AB_INITS)
        check_choice("PsoftConfig", "psoft_svd", self.psoft_svd, SVD_BACKENDS)
        self._check_unused_options()

    def _check_unused_options(self) -> None:
        """As HF PEFT: options of a mode that is off are warned about; those of a mode that is on checked."""
        defaults = type(self).__dataclass_fields__
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != defaults[
                "psoft_svd_lowrank_niter"].default:
            _warn_ignored("psoft_svd_lowrank_niter", self.psoft_svd_lowrank_niter, "psoft_svd='lowrank'")
        if self.use_cayley_neumann:
            check_positive_ints(self, "PsoftConfig", ("num_cayley_neumann_terms",))
            eps = self.cayley_neumann_eps
            if eps is not None and not 0.0 < eps < 1.0:
                raise ValueError(f"PsoftConfig.cayley_neumann_eps must be in (0, 1) when set, got {eps!r}.")
            return
        neumann = "use_cayley_neumann=True"
        if self.num_cayley_neumann_terms != defaults["num_cayley_neumann_terms"].default:
            _warn_ignored("num_cayley_neumann_terms", self.num_cayley_neumann_terms, neumann)
        if self.cayley_neumann_eps is not None:
            _warn_ignored("cayley_neumann_eps", self.cayley_neumann_eps, neumann)


def _warn_ignored(option: str, value, needs: str) -> None:
    warnings.warn(f"PsoftConfig.{option}={value!r} is ignored: it only applies with {needs}.", UserWarning,
                  stacklevel=5)  # the caller of PsoftConfig(...), past __init__ and __post_init__
