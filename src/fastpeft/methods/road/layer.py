"""RoAd layers: the base output's features rotated in pairs by learned, scaled 2x2 rotations.

Liao et al., "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and Composability"
(https://arxiv.org/abs/2409.00119), eq. 4. The (out,) output h is cut into groups of g = group_size features;
in each group feature k (first half, h1) is paired with feature k + g/2 (second half, h2):

    h1' = c1 * h1 - s1 * h2
    h2' = s2 * h1 + c2 * h2        c = alpha * cos(theta), s = alpha * sin(theta), elementwise.

Written over the whole output: h' = h * diag + swap(h) * cross, with diag = (c1 | c2) and cross = (s1 | s2)
per group, and swap(h) = (-h2 | h1). The variants differ in how many angles / scales feed diag and cross
(config.VARIANTS). Only elementwise products are needed, so each row of a batch can use its own adapter.

Merging uses R (W x + b) = (R W) x + R b: the rotation is applied to the weight's rows and to the bias.
Each 2x2 block [[c1, -s1], [s2, c2]] is inverted in closed form for unmerging (it is a scaled rotation
only when c1 = c2 and s1 = s2, so not always orthogonal).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.layer import AdapterLayer
from .config import VARIANTS


def parameter_count(variant: str, out_features: int) -> int:
    """Length of the angle and of the scale vector of a layer with `out_features` outputs."""
    return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[variant]


def coefficients(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag, cross), each (out,), from the adapter's angles and scales (layouts per variant below)."""
    if variant == "road_4":
        # (groups, 2, g): row 0 feeds the diagonal (cosine), row 1 the cross term (sine)
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()
    if variant == "road_1":
        # (groups, g/2): one angle and scale per pair, used for both of its features
        half = group_size // 2
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).flatten()
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).flatten()
    return alpha * theta.cos(), alpha * theta.sin()


def swap_halves(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """(-h2 | h1) in every group of the last dimension of `h` (..., out)."""
    grouped = h.reshape(*h.shape[:-1], -1, 2, group_size // 2)
    return torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).reshape(h.shape)


def rotate(h: torch.Tensor, diag: torch.Tensor, cross: torch.Tensor, group_size: int) -> torch.Tensor:
    """h' = h * diag + swap(h) * cross; `diag` / `cross` broadcast against `h` (..., out)."""
    return h * diag + swap_halves(h, group_size) * cross


def inverse_coefficients(diag: torch.Tensor, cross: torch.Tensor, group_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag, cross) of the inverse rotation: [[c1, -s1], [s2, c2]]^-1 = [[c2, s1], [-s2, c1]] / det with
    det = c1 c2 + s1 s2, so diag' = (c2 | c1) / det and cross' = -(s1 | s2) / det."""
    half = group_size // 2
    d, c = diag.reshape(-1, 2, half), cross.reshape(-1, 2, half)
    det = (d[:, 0] * d[:, 1] + c[:, 0] * c[:, 1]).unsqueeze(1)  # (groups, 1, g/2): one per pair
    return (d.flip(1) / det).flatten(), (-c / det).flatten()


def singular_pairs(diag: torch.Tensor, cross: torch.Tensor, group_size: int) -> int:
    """How many 2x2 blocks cannot be inverted (zero or non-finite determinant)."""
    half = group_size // 2
    d, c = diag.reshape(-1, 2, half), cross.reshape(-1, 2, half)
    det = d[:, 0] * d[:, 1] + c[:, 0] * c[:, 1]
    return int(((det == 0) | ~torch.isfinite(det)).sum())


class RoadLayer(AdapterLayer):
    """Per-adapter angles `road_theta` and scales `road_alpha`; the rotation acts on the base output, so
    several active adapters compose (each rotates what the previous one gave, as HF PEFT)."""

    adapter_param_names = ("road_theta", "road_alpha")
    additive = False
    input_cast_switchable = True  # the only cast (base output -> adapter dtype) goes through cast_input

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "a layer",
                 **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = self.feature_sizes(base_layer)
        self.target_name = target_name
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        self.update_layer(adapter_name, config)

    @staticmethod
    def feature_sizes(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        variant, group_size = config.variant, config.group_size
        if variant not in VARIANTS:
            raise ValueError(f"RoAd variant must be one of {list(VARIANTS)}, got {variant!r}.")
        if self.out_features % group_size:
            raise ValueError(
                f"RoAd group_size={group_size} does not divide the output size {self.out_features} of layer "
                f"'{self.target_name}' ({self.in_features} -> {self.out_features}): set group_size to an "
                "even divisor of every adapted layer's output size, or leave this layer out of the targets.")
        self.variant[adapter_name], self.group_size[adapter_name] = variant, group_size
        size = parameter_count(variant, self.out_features)
        self.road_theta[adapter_name] = nn.Parameter(torch.empty(size))
        self.road_alpha[adapter_name] = nn.Parameter(torch.empty(size))
        theta, alpha = self.road_theta[adapter_name], self.road_alpha[adapter_name]
        with torch.no_grad():  # HF PEFT's draws, from the global RNG in this order
            if config.init_weights:
                theta.zero_()
                alpha.fill_(1.0)
            else:
                theta.normal_(0.0, 0.5)
                alpha.normal_(1.0, 0.5)

    def coefficients(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return coefficients(self.variant[name], self.group_size[name], self.road_theta[name],
                            self.road_alpha[name])

    # ------------------------------------------------------------------ forward
    def adapted_forward(self, x, names: list[str], *args, **kwargs):
        result = self.base_forward(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in names:
            if name in self.road_theta:
                result = self.cast_input(result, self.road_theta[name].dtype)
                diag, cross = self.coefficients(name)
                result = rotate(result, diag, cross, self.group_size[name])
        return result.to(out_dtype)

    def mixed_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Every row rotated by its own adapter in one pass: the (diag, cross) vectors of the batch's adapters
        are stacked and gathered per row. Rows of '__base__' (or of adapters this layer lacks) keep the base
        output. Adapters of different group sizes or dtypes in one batch go adapter by adapter."""
        self.check_mixed_batch(x, adapter_names)
        own = sorted(set(adapter_names) & set(self.road_theta))
        if len({(self.group_size[n], self.road_theta[n].dtype) for n in own}) > 1:
            return self._grouped_forward(x, adapter_names, *args, **kwargs)
        result = self.base_forward(x, *args, **kwargs)
        if not own:
            return result
        slot = {name: i for i, name in enumerate(own)}
        rows = torch.tensor([slot.get(n, -1) for n in adapter_names], device=result.device)
        stacked = [self.coefficients(n) for n in own]
        chosen = rows.clamp(min=0)
        shape = (len(adapter_names),) + (1,) * (result.dim() - 2) + (result.shape[-1],)  # (n, 1.., out)
        diag = torch.stack([d for d, _ in stacked])[chosen].view(shape)
        cross = torch.stack([c for _, c in stacked])[chosen].view(shape)
        rotated = rotate(result.to(diag.dtype), diag, cross, self.group_size[own[0]])
        keep = (rows < 0).view((-1,) + (1,) * (result.dim() - 1))
        return torch.where(keep, result, rotated.to(result.dtype))

    # ------------------------------------------------------------------ merging
    def _rotated(self, tensor: torch.Tensor, diag: torch.Tensor, cross: torch.Tensor, group_size: int
                 ) -> torch.Tensor:
        """R @ tensor for a weight (out, in) or a bias (out,), computed in at least float32."""
        work = torch.promote_types(tensor.dtype, torch.float32)
        diag, cross = diag.detach().to(work), cross.detach().to(work)
        t = tensor.detach().to(work)
        if t.dim() == 1:
            return rotate(t, diag, cross, group_size)
        return rotate(t.T, diag, cross, group_size).T.contiguous()

    def _apply_rotation(self, name: str, inverse: bool, safe: bool) -> None:
        base = self.get_base_layer()
        diag, cross = self.coefficients(name)
        group_size = self.group_size[name]
        if inverse:
            work = torch.promote_types(diag.dtype, torch.float32)
            diag, cross = inverse_coefficients(diag.detach().to(work), cross.detach().to(work), group_size)
        params = [p for p in (base.weight, getattr(base, "bias", None)) if p is not None]
        values = [self._rotated(p, diag, cross, group_size) for p in params]
        if safe and not all(torch.isfinite(v).all() for v in values):
            raise ValueError(f"NaNs or infs in the merged weights: RoAd adapter '{name}' seems to be broken.")
        for param, value in zip(params, values):
            param.data = value.to(param.dtype)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        self._apply_rotation(name, inverse=False, safe=safe_merge)

    def unmerge(self) -> None:
        # checked first, so a refusal leaves every merged adapter in place
        for name in self.merged_adapters:
            diag, cross = self.coefficients(name)
            bad = singular_pairs(diag.detach().float(), cross.detach().float(), self.group_size[name])
            if bad:
                raise ValueError(
                    f"Cannot unmerge RoAd adapter '{name}' from layer '{self.target_name}': {bad} of its 2x2 "
                    "rotation blocks are singular (a zero scale), so the merged weight lost information "
                    "that no inverse can restore. Reload the base model instead (merge such an adapter "
                    "only with merge_and_unload).")
        super().unmerge()

    def unmerge_one(self, name: str) -> None:
        self._apply_rotation(name, inverse=True, safe=False)


class Linear(RoadLayer):
    """RoAd on an nn.Linear (HF PEFT's class name)."""
