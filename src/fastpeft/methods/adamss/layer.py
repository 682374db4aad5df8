"""AdaMSS layers: per-cluster low-rank updates of an nn.Linear, in the weight's top-R singular subspace.

With W' = [W | b] (out, in + 1) when the layer has a bias (else W), V^T (R, in') its top right singular
vectors (frozen: `adamss_newB`) and the output rows split into K clusters I_k (subspaces.py), the layer adds

    y[..., I_k] += B_k A_k V^T x'     x' = [x, 1] with a bias, else x; A_k (r_k, R), B_k (|I_k|, r_k)

so dW'[I_k] = B_k A_k V^T; its last column (with a bias) is the update of the bias. The clusters are not
stored in files: they are rebuilt from the base weight (seeded SVD and k-means) when an adapter is created or
loaded. As HF PEFT 0.21, base and adapter run in the base weight's dtype and the output is cast back to the
input's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from .._shared.importance import smooth_importance
from .._shared.random_projections import BufferDict
from .subspaces import decompose

HALF = (torch.float16, torch.bfloat16)
RANDOM_B_STD = 0.01  # init_weights=None: B ~ N(0, 0.01^2), as HF PEFT
ASA_STATE = ("exp_avg_ipt_A", "exp_avg_ipt_B", "exp_avg_unc_A", "exp_avg_unc_B")


class AdamssLayer(AdapterLayer):
    """AdaMSS adapters on a linear layer. Per adapter: `adamss_A` / `adamss_B` (a ParameterList each, one
    entry per subspace: file keys `adamss_A.<k>`), `adamss_newB` (the frozen V^T, saved), and bookkeeping
    under HF PEFT's names: num_subspaces, seg_result (cluster -> rows), scatter_index (the rows of all
    clusters, in cluster order), train_subspace_index, and the ASA importance EMAs (exp_avg_*)."""

    adapter_param_names = ("adamss_A", "adamss_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, target_name: str = "a layer",
                 **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.target_name = target_name
        self.adamss_A = nn.ModuleDict()
        self.adamss_B = nn.ModuleDict()
        self.adamss_newB = BufferDict(persistent=True)  # saved in files (key adamss_newB)
        self.num_subspaces: dict[str, int] = {}
        self.train_subspace_index: dict[str, list[int]] = {}
        self.seg_result: dict[str, dict[int, torch.Tensor]] = {}
        self.scatter_index: dict[str, torch.Tensor] = {}
        for attr in ASA_STATE:
            setattr(self, attr, {})
        self.update_layer(adapter_name, config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs, A, B and V^T are cast to in forward: the base weight's."""
        return self.base_layer.weight.dtype

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        dtype, device = weight.dtype, weight.device
        full = weight if bias is None else torch.cat((weight, bias.unsqueeze(1)), dim=1)

        def initial_b(rows: int, rank: int) -> torch.Tensor:
            if config.init_weights == "orthogonal":
                return torch.zeros(rows, rank, dtype=dtype, device=device)
            return torch.randn(rows, rank, dtype=dtype, device=device) * RANDOM_B_STD

        sub = decompose(full, config, initial_b)
        count = len(sub.clusters)
        self.num_subspaces[adapter_name] = count
        self.train_subspace_index[adapter_name] = list(range(count))
        self.seg_result[adapter_name] = dict(enumerate(sub.clusters))
        self.scatter_index[adapter_name] = torch.cat(sub.clusters).to(device)
        self.adamss_newB[adapter_name] = sub.projection.to(dtype)
        self.adamss_A[adapter_name] = nn.ParameterList([nn.Parameter(a.to(dtype)) for a in sub.a_inits])
        self.adamss_B[adapter_name] = nn.ParameterList([nn.Parameter(b.to(dtype)) for b in sub.b_inits])
        if config.use_asa:
            for attr in ASA_STATE:
                getattr(self, attr)[adapter_name] = [None] * count

    def adapter_tensors(self, name: str):
        yield from self.adapter_parameters(name)
        if name in self.adamss_newB:
            yield f"adamss_newB.{name}", self.adamss_newB[name]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.adamss_newB:
            del self.adamss_newB[name]

    # ------------------------------------------------------------------ forward and merge
    def adapted_forward(self, x, names, *args, **kwargs):
        in_dtype = x.dtype
        out = super().adapted_forward(x.to(self.dtype), names, *args, **kwargs)
        return out.to(in_dtype)

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        """x' = [x, 1] for a layer with a bias (its update is V^T's last column), else x."""
        if self.base_layer.bias is None:
            return x
        return torch.cat((x, x.new_ones(*x.shape[:-1], 1)), dim=-1)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = self.dtype
        h = F.linear(self._augmented(x.to(dtype)), self.adamss_newB[name].to(dtype))  # (..., R)
        parts = [F.linear(F.linear(h, a.to(dtype)), b.to(dtype))  # (..., |I_k|)
                 for a, b in zip(self.adamss_A[name], self.adamss_B[name])]
        delta = torch.cat(parts, dim=-1)  # (..., out), rows in cluster order
        index = self.scatter_index[name].to(delta.device)
        return delta.new_zeros(*delta.shape[:-1], self.out_features).index_copy(-1, index, delta)

    def _full_delta(self, name: str) -> torch.Tensor:
        """dW' (out, in'): rows I_k = B_k A_k V^T. Half-precision weights on the CPU are computed in float32
        (as HF PEFT), others in the weight's dtype."""
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.device.type == "cpu" and weight.dtype in HALF else weight.dtype
        proj = self.adamss_newB[name].to(weight.device, dtype)
        rows = [b.to(weight.device, dtype) @ a.to(weight.device, dtype) @ proj
                for a, b in zip(self.adamss_A[name], self.adamss_B[name])]
        full = torch.zeros(self.out_features, proj.shape[1], device=weight.device, dtype=dtype)
        full[self.scatter_index[name].to(weight.device)] = torch.cat(rows)
        return full

    def delta_weight(self, name: str) -> torch.Tensor:
        full = self._full_delta(name)
        if self.base_layer.bias is not None:
            full = full[:, :-1]
        return full.to(self.base_layer.weight.dtype)

    def delta_bias(self, name: str) -> torch.Tensor | None:
        if self.base_layer.bias is None:
            return None
        return self._full_delta(name)[:, -1].to(self.base_layer.weight.dtype)

    # ------------------------------------------------------------------ ASA importance
    def reset_importance(self, adapter_name: str) -> None:
        """Start a new scoring window (after each pruning round)."""
        if adapter_name in self.exp_avg_ipt_A:
            for attr in ASA_STATE:
                getattr(self, attr)[adapter_name] = [None] * self.num_subspaces[adapter_name]

    def update_importance(self, adapter_name: str, importance_beta: float = 0.85,
                          uncertainty_beta: float = 0.85) -> None:
        """Fold this step's gradients into the EMAs of every subspace's A and B (entries without a gradient,
        e.g. pruned subspaces, are skipped). The uncertainty is measured against the previous average."""
        if adapter_name not in self.exp_avg_ipt_A or adapter_name not in self.adamss_A:
            return
        for params, avgs, uncs in ((self.adamss_A[adapter_name], self.exp_avg_ipt_A[adapter_name],
                                    self.exp_avg_unc_A[adapter_name]),
                                   (self.adamss_B[adapter_name], self.exp_avg_ipt_B[adapter_name],
                                    self.exp_avg_unc_B[adapter_name])):
            for i, param in enumerate(params):
                if param.grad is None:
                    continue
                if avgs[i] is None:
                    avgs[i], uncs[i] = torch.zeros_like(param.detach()), torch.zeros_like(param.detach())
                smooth_importance(param, avgs[i], uncs[i], importance_beta, uncertainty_beta,
                                  deviation_first=True)

    def subspace_scores(self, adapter_name: str) -> list[tuple[int, torch.Tensor]]:
        """(subspace, score) of the subspaces scored in this window: mean(ipt * unc) of A plus that of B."""
        ia, ib = self.exp_avg_ipt_A[adapter_name], self.exp_avg_ipt_B[adapter_name]
        ua, ub = self.exp_avg_unc_A[adapter_name], self.exp_avg_unc_B[adapter_name]
        return [(i, (ia[i] * ua[i]).mean() + (ib[i] * ub[i]).mean())
                for i in range(self.num_subspaces[adapter_name]) if ia[i] is not None and ib[i] is not None]

    def set_subspace_active(self, adapter_name: str, index: int, active: bool) -> None:
        """A pruned subspace stops training (no gradient, so optimizers skip it); its values stay."""
        for params in (self.adamss_A[adapter_name], self.adamss_B[adapter_name]):
            params[index].requires_grad = active
            if not active:
                params[index].grad = None


class Linear(AdamssLayer):
    """AdaMSS on an nn.Linear."""
