"""PVeRA layer (Probabilistic VeRA, https://arxiv.org/abs/2512.07703) for nn.Linear and transformers' Conv1D.

For an input x (..., in), with the model's shared frozen A: (2r, in_max) and B: (out_max, r)
(_shared/random_projections.py) sliced to this layer (A[:, :in], B[:out]):
    [mu, logvar] = lambda_d * (x @ A.T)            (..., 2r), split in two halves of r
    z = mu + eps * exp(logvar / 2), eps ~ N(0, I)  (the reparametrisation trick, Kingma & Welling, 2014)
    output += lambda_b * (z @ B.T)                 (..., out)
z is sampled in training mode, and in eval mode only with `sample_at_inference`; otherwise z = mu. Merging
therefore adds the mean's update: delta_W = diag(lambda_b) B diag(lambda_d[:r]) A[:r].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.random_projections import ProjectionLayer

logger = logging.getLogger(__name__)


def _half_on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


def _in_backward() -> bool:
    """True inside autograd's backward with grad on: where activation checkpointing re-runs a forward."""
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1


class PveraLinear(ProjectionLayer):
    adapter_param_names = ("pvera_lambda_b", "pvera_lambda_d")
    projection_names = ("pvera_A", "pvera_B")
    method_label = "PVeRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, projections,
                 fan_in_fan_out: bool = False, target_name: str = ""):
        super().__init__(base_layer, projections, fan_in_fan_out)
        self.target_name = target_name
        self.pvera_dropout = nn.ModuleDict()
        self.pvera_lambda_b = nn.ParameterDict()
        self.pvera_lambda_d = nn.ParameterDict()
        # per adapter (plain dicts: delete_adapter drops their entries)
        self.sample_at_inference: dict[str, bool] = {}
        # CPU generators: nn.Module.to() does not move a torch.Generator, so the noise is drawn on CPU
        self.pvera_generator: dict[str, torch.Generator | None] = {}
        self.update_layer(adapter_name, config, projections=projections, fan_in_fan_out=fan_in_fan_out)

    def update_layer(self, adapter_name: str, config, projections=None, fan_in_fan_out: bool = False,
                     **kwargs) -> None:
        if projections is not None:
            self.share_projections(projections)
        a, b = self.shared(adapter_name)
        self.check_fits(adapter_name, {"pvera_A": (1, self.in_features, a.shape[1]),
                                       "pvera_B": (0, self.out_features, b.shape[0])})
        self.r[adapter_name] = config.r
        self.sample_at_inference[adapter_name] = config.sample_at_inference
        seed = config.generator_seed
        self.pvera_generator[adapter_name] = None if seed is None else torch.Generator().manual_seed(seed)
        self.pvera_dropout[adapter_name] = (nn.Dropout(config.pvera_dropout) if config.pvera_dropout > 0
                                            else nn.Identity())
        # drawn as HF PEFT does (ones, then a standard normal of 2r) before the optional no-op init, so that
        # the global RNG advances alike
        self.pvera_lambda_b[adapter_name] = nn.Parameter(torch.ones(self.out_features))
        self.pvera_lambda_d[adapter_name] = nn.Parameter(torch.randn(2 * config.r))
        if config.init_weights:
            with torch.no_grad():
                self.pvera_lambda_d[adapter_name].fill_(config.d_initial)
                self.pvera_lambda_b[adapter_name].zero_()

    def sliced(self, name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's parts of the shared matrices: A[:, :in] (2r, in) and B[:out] (out, r)."""
        a, b = self.shared(name)
        return (a[:, : self.in_features].to(device=device, dtype=dtype),
                b[: self.out_features].to(device=device, dtype=dtype))

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        lambda_d, lambda_b = self.pvera_lambda_d[name], self.pvera_lambda_b[name]
        a, b = self.sliced(name, lambda_d.dtype, x.device)
        h = lambda_d * F.linear(self.pvera_dropout[name](x.to(lambda_d.dtype)), a)  # (..., 2r)
        mu, logvar = h.chunk(2, dim=-1)
        return lambda_b * F.linear(self.latent(name, mu, logvar), b)

    def latent(self, name: str, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z: the mean, or mean + noise * std when sampling (training mode or `sample_at_inference`)."""
        if not (self.training or self.sample_at_inference[name]):
            return mu
        std = torch.exp(0.5 * logvar)
        generator = self.pvera_generator[name]
        if generator is None:  # the global RNG, which checkpointing saves and replays
            return mu + torch.randn_like(std) * std
        if _in_backward():
            raise NotImplementedError(
                f"PVeRA adapter '{name}' (layer '{self.target_name}') samples from its own generator "
                "(generator_seed), which activation checkpointing cannot replay: the forward re-run in "
                "backward would draw other noise than the forward did, and the gradients would be wrong. "
                "Set generator_seed=None (torch's global RNG, replayed by checkpointing) or turn activation "
                "checkpointing off.")
        eps = torch.randn(std.shape, dtype=std.dtype, generator=generator).to(std.device)
        return mu + eps * std

    def delta_weight(self, name: str) -> torch.Tensor:
        """The mean's update (out, in): only the first r entries of lambda_d and rows of A (the mean half)."""
        lambda_d, lambda_b = self.pvera_lambda_d[name], self.pvera_lambda_b[name]
        dtype = torch.float32 if _half_on_cpu(lambda_d) else lambda_d.dtype  # slow half matmuls on CPU
        a, b = self.sliced(name, dtype, lambda_d.device)
        r = self.r[name]
        delta = (lambda_b.to(dtype)[:, None] * b) @ (lambda_d.to(dtype)[:r, None] * a[:r])
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(lambda_d.dtype)

    def merge_one(self, name: str, safe_merge: bool) -> None:
        if self.sample_at_inference[name]:
            logger.warning("PVeRA adapter '%s' samples at inference, but a merged adapter adds its mean "
                           "only: the merged layer '%s' is deterministic.", name, self.target_name)
        super().merge_one(name, safe_merge)
