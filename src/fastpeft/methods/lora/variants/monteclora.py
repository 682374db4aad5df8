"""MonteCLoRA: LoRA whose A factor is averaged over Monte Carlo perturbations while training
(`monteclora_config`).

Sengupta et al. 2024, "Robust and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank
Adaptation". In training, each forward draws `num_samples` Gaussian perturbations E_k (in, r) of A^T whose
per-rank variance comes from a Wishart-reparameterised covariance, and mixes the perturbed copies with
Dirichlet weights w (a Laplace / softmax-basis Gaussian approximation of the Dirichlet):

    A_train = (sum_k w_k (A^T + E_k))^T,        y = base(x) + s * B A_train dropout(x)

In eval mode, and when merging, the adapter is plain LoRA (s * B A). The variational parameters (`std_prior`
(r,), `expert_weights_prior` (num_samples,)) train with A and B; the regulariser `_get_monteclora_loss()` (KL
terms plus an optional entropy term, in training mode only) is added to the task loss by the user, as in HF
PEFT.

Files (as HF PEFT 0.21): `lora_monteclora_sampler.{std_prior, expert_weights_prior}` and the buffers
`lora_monteclora_sampler.{gaussian_var_prior (r, r), expert_weights (num_samples,)}` holding the last training
sample's covariance and mixing weights.

Random draws: the standard-normal / chi-square draws behind the perturbations are drawn ahead, `buffer_size`
forward passes at a time, when the adapter is built and whenever they run out, in HF PEFT's order; so with the
same seed both libraries train on the same perturbations.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..subconfig import register_coercion
from .base import AdditiveMerge

logger = logging.getLogger(__name__)

SAMPLER = "lora_monteclora_sampler"  # the layer's ModuleDict of samplers (HF PEFT's attribute name)
VAR_FLOOR = 1e-3  # smallest per-rank variance of the perturbations
EPS = 1e-6


@dataclass
class MontecloraConfig:
    """MonteCLoRA settings (HF PEFT 0.21's names and defaults).

    num_samples: perturbed copies of A mixed per forward. use_entropy: add sum(w^2) of the mixing weights to
    the loss. dirichlet_prior: concentration of the Dirichlet prior on the mixing weights. sample_scaler:
    scale of the perturbations (near 0: plain LoRA). kl_loss_weight: weight of the KL terms. buffer_size:
    forward passes whose random draws are made ahead at once (memory:
    buffer_size * num_samples * in_features * r numbers per layer).
    """

    num_samples: int = field(default=8, metadata={"help": "Monte Carlo samples mixed per forward pass."})
    use_entropy: bool = field(default=False,
                              metadata={"help": "Add the mixing weights' sum of squares to the loss."})
    dirichlet_prior: float = field(default=0.1, metadata={"help": "Dirichlet prior concentration (> 0)."})
    sample_scaler: float = field(default=1e-4, metadata={"help": "Scale of the sampled perturbations of A."})
    kl_loss_weight: float = field(default=1e-5,
                                  metadata={"help": "Weight of the KL terms in the regulariser."})
    buffer_size: int = field(default=150,
                             metadata={"help": "Forward passes whose random draws are made at once."})

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(f"MontecloraConfig.num_samples must be > 0, got {self.num_samples}.")
        if self.dirichlet_prior <= 0:
            raise ValueError(f"MontecloraConfig.dirichlet_prior must be > 0, got {self.dirichlet_prior}.")
        if (isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int)
            or self.buffer_size <= 0):
            raise ValueError(
                f"MontecloraConfig.buffer_size must be a positive integer, got {self.buffer_size!r}.")


register_coercion("monteclora_config", MontecloraConfig)  # LoraConfig.monteclora_config: a file holds a dict


# ---------------------------------------------------------------------------------------------- random draws
def _wishart_diagonal(p: int, device) -> torch.Tensor:
    """diag(W) of one W ~ Wishart(df=p, I_p) by the Bartlett decomposition W = L L^T (Bartlett 1933).

    L is lower triangular with sqrt(chi2(p - i)) on the diagonal and N(0, 1) below it; drawn in torch's
    Wishart order (chi-squares, then the sub-diagonal normals row by row), in float32.
    """
    df = torch.full((p,), float(p), device=device) - torch.arange(p, dtype=torch.float32, device=device)
    chi = torch.distributions.Chi2(df).rsample()
    low = torch.diag_embed(chi.sqrt().clamp(min=torch.finfo(chi.dtype).eps))
    rows, cols = torch.tril_indices(p, p, offset=-1)
    low[rows, cols] = torch.randn(p * (p - 1) // 2, device=device)
    return (low @ low.T).diagonal()


class _Draws:
    """Standard draws for `size` forward passes, made together and handed out one pass at a time."""

    def __init__(self, n_in: int, rank: int, num_samples: int, size: int, device, dtype) -> None:
        self.shape, self.size, self.device, self.dtype = (num_samples, n_in, rank), size, device, dtype
        self.refill()

    @torch.no_grad()
    def refill(self) -> None:
        n, n_in, rank = self.shape
        self.gauss = torch.randn((self.size, n, n_in, rank), device=self.device, dtype=self.dtype)
        self.mixing = torch.randn((self.size, n), device=self.device, dtype=self.dtype)
        self.wishart = torch.stack([_wishart_diagonal(rank, self.device)
                                    for _ in range(self.size)]).to(self.dtype)
        self.index = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.index >= self.size:
            self.refill()
        i, self.index = self.index, self.index + 1
        return self.gauss[i], self.wishart[i], self.mixing[i]


# ---------------------------------------------------------------------------------------------- sampler
class MontecloraSampler(nn.Module):
    """Variational parameters of one adapter on one layer; forward() draws (perturbations, mixing weights)."""

    def __init__(self, n_in: int, rank: int, cfg: MontecloraConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.n_in, self.rank, self.cfg = n_in, rank, cfg
        self.std_prior = nn.Parameter(torch.rand(rank, dtype=dtype))  # log std per rank
        # log Dirichlet alpha
        self.expert_weights_prior = nn.Parameter(torch.rand(cfg.num_samples, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, dtype=dtype))
        self.register_buffer("expert_weights",
                             torch.full((cfg.num_samples,), 1 / cfg.num_samples, dtype=dtype))
        if device is not None and not self.std_prior.is_meta:  # meta (low_cpu_mem_usage): placed on load
            self.to(device)
        self.draws = _Draws(n_in, rank, cfg.num_samples, cfg.buffer_size, device, dtype)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(perturbations E (num_samples, in, r), mixing weights w (num_samples,)); keeps both priors'
        samples."""
        like = self.std_prior
        gauss, wishart, mixing = (t.to(device=like.device, dtype=like.dtype) for t in self.draws.next())
        std = torch.exp(self.std_prior)
        var = ((std * wishart) * std).clamp(min=VAR_FLOOR)  # diag(S Z S), S = diag(std), Z ~ Wishart(r, I)
        self.gaussian_var_prior = torch.diag(var)
        noise = (torch.nan_to_num(gauss * var.float().sqrt().to(var.dtype), nan=VAR_FLOOR)
                 * self.cfg.sample_scaler)
        self.expert_weights = torch.softmax(self._mixing_logits(mixing), dim=-1)
        return noise, self.expert_weights

    def _mixing_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ~ N(mu, Sigma) approximating Dirichlet(alpha) in the softmax basis (MacKay 1998), diagonal
        Sigma."""
        n = self.cfg.num_samples
        alpha = torch.exp(self.expert_weights_prior).clamp(min=EPS)
        log_alpha = torch.log(alpha)
        inv = 1 / alpha
        var = (inv * (1 - 2 / n) + 1 / (n ** 2) * inv.sum()).clamp(min=EPS)
        return (var + EPS).float().sqrt().to(var.dtype) * z + (log_alpha - log_alpha.mean())

    # -------- regulariser (HF PEFT's terms)
    def variational_loss(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(kl_loss_weight * KL terms, entropy term); (0.0, 0.0) in eval mode."""
        if not self.training:
            return 0.0, 0.0
        kl = self._dirichlet_kl() + self._wishart_kl() + self._gaussian_kl()
        entropy = self.expert_weights.square().sum() if self.cfg.use_entropy else 0
        return self.cfg.kl_loss_weight * kl, entropy

    def _dirichlet_kl(self) -> torch.Tensor:
        """HF PEFT's Dirichlet term between Dir(exp(expert_weights_prior)) and Dir(dirichlet_prior): note its
        log-Gamma sum enters with a + sign (the textbook KL has -); kept for identical losses. In log-Gamma
        form (no overflow where HF PEFT's Gamma ratio overflows)."""
        a2 = torch.exp(self.expert_weights_prior)
        a1 = torch.full_like(a2, self.cfg.dirichlet_prior)
        s2 = a2.sum()
        return (torch.lgamma(s2) - torch.lgamma(a1.sum()) + (torch.lgamma(a2) - torch.lgamma(a1)).sum()
                + ((a2 - a1) * (torch.digamma(a2) - torch.digamma(s2))).sum())

    def _wishart_kl(self) -> torch.Tensor:
        std = torch.exp(self.std_prior)
        var = std * std
        r = self.rank
        return 0.5 * (-torch.log(var).sum() * r + var.sum() * r - r ** 2)

    def _gaussian_kl(self) -> torch.Tensor:
        var = self.gaussian_var_prior.diagonal().clamp(min=EPS)
        return self.cfg.num_samples * 0.5 * (var.sum() - torch.log(var).sum() - self.rank)


# ---------------------------------------------------------------------------------------------- the variant
class Monteclora(AdditiveMerge):
    """MonteCLoRA on nn.Linear / Conv1D; merging uses plain LoRA's s B A (the sampling is a training
    device)."""

    def init(self, layer, name):
        if not hasattr(layer, SAMPLER):
            # trained, saved, deleted with A/B
            layer.adapter_param_names = (*layer.adapter_param_names, SAMPLER)
            setattr(layer, SAMPLER, nn.ModuleDict())
        weight = layer.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else None
        getattr(layer, SAMPLER)[name] = MontecloraSampler(layer.in_features, layer.r[name],
                                                          self.config.monteclora_config, weight.device, dtype)

    def contribution(self, layer, name, x, result):
        a, b = layer.lora_A[name], layer.lora_B[name]
        x = layer.cast_input(x, a.weight.dtype)
        weight = a.weight
        if layer.training:
            x = layer.lora_dropout[name](x)
            weight = _sampled_a(getattr(layer, SAMPLER)[name], weight)
        return b(F.linear(x, weight)) * layer.scaling[name]

    def extra_tensors(self, layer, name):
        sampler = getattr(layer, SAMPLER)[name]
        return tuple((f"{SAMPLER}.{name}.{key}", buf) for key, buf in sampler.named_buffers())


def _sampled_a(sampler: MontecloraSampler, a: torch.Tensor) -> torch.Tensor:
    """A (r, in) mixed over the sampled perturbations: (sum_k w_k (A^T + E_k))^T; A itself if sampling gave
    NaNs."""
    noise, mix = sampler()
    if torch.isnan(noise).any() or torch.isnan(mix).any():
        warnings.warn("MonteCLoRA sampling produced NaNs; using the unperturbed lora_A for this step.",
                      stacklevel=3)
        return a
    perturbed = a.T + torch.nan_to_num(noise, nan=0.0)  # (num_samples, in, r)
    return torch.einsum("n,nij->ij", mix, perturbed).T


def monteclora_loss(tuner, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
    """Mean over MonteCLoRA samplers of (KL + entropy) for `adapter_names` (default: the active adapters); 0.0
    when there are none. Add it to the task loss in training (HF PEFT's `_get_monteclora_loss`)."""
    names = tuner.active_adapters if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    total, count = 0.0, 0
    for module in tuner.modules():
        samplers = module._modules.get(SAMPLER) if hasattr(module, "lora_variant") else None
        for name in names if samplers is not None else ():
            if name in samplers:
                kl, entropy = samplers[name].variational_loss()
                total, count = total + kl + entropy, count + 1
    return total / count if count else 0.0
