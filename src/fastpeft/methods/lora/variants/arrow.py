"""Arrow: per-token routing over a library of trained LoRA experts (HF PEFT 0.21's `arrow_config`).

Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs")
gives every expert a prototype: the top right-singular vector of its update B A, a direction in the layer's
input space. A token x is scored against expert e by |<x, p_e>| (the sign of a singular vector is arbitrary),
the top_k scores go through a softmax with temperature T, and the layer adds sum_e c_e(x) * s_e * B_e A_e x.

GenKnowSub (Bagherifard et al. 2025, "GenKnowSub: Improving Modularity and Reusability of LLMs through General
Knowledge Subtraction", ACL short) first subtracts the mean of some "general knowledge" adapters from each
task expert: A_e -= mean(A_g), B_e -= mean(B_g), once, in place, before the prototypes are computed.

The router is an ordinary LoRA adapter (its own A and B are saved but never used) whose variant reads the
experts that sit beside it in the same layer. `create_arrow_model` builds such a model from adapter folders.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ....core.device_index import index_tensor
from ....peft_model import PeftModel
from ..config import LoraConfig
from ..subconfig import register_coercion
from .base import LoraVariant

logger = logging.getLogger(__name__)

TASK_PREFIX = "task_"  # names create_arrow_model gives the experts: task_0, task_1, ...
GKS_PREFIX = "gks_"  # ... and the general-knowledge adapters: gks_0, gks_1, ...
ROUTER_NAME = "arrow_router"
_GKS_NAME = re.compile(rf"{GKS_PREFIX}\d+")
POWER_ITERATIONS = 15  # HF PEFT's count for the prototype's power iteration
_EPS = 1e-8


@dataclass
class ArrowConfig:
    """Settings of the Arrow router (HF PEFT 0.21's field names and defaults).

    top_k: experts mixed per token. router_temperature: softmax temperature of their scores. use_gks: apply
    GenKnowSub with the adapters in gks_adapter_names. rng_seed: seed of the power iteration's start vector
    (None: torch's global generator). task_adapter_names / gks_adapter_names are filled in by
    `create_arrow_model`; they are written to adapter_config.json but, as in HF PEFT, not read back from it.
    """

    top_k: int = field(default=3, metadata={"help": "Experts mixed per token."})
    router_temperature: float = field(default=1.0,
                                      metadata={"help": "Softmax temperature of the expert scores."})
    use_gks: bool = field(default=False,
                          metadata={"help": "Subtract general-knowledge adapters (GenKnowSub)."})
    task_adapter_names: list[str] | None = field(default=None, init=False, metadata={
        "help": "The expert adapters; set by create_arrow_model()."})
    gks_adapter_names: list[str] | None = field(default=None, init=False, metadata={
        "help": "The general-knowledge adapters for GenKnowSub; set by create_arrow_model()."})
    rng_seed: int | None = field(default=None, metadata={"help": "Seed of the prototypes' power iteration."})

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise ValueError(f"ArrowConfig.top_k must be a positive number of experts, got {self.top_k}.")
        if self.router_temperature <= 0:
            raise ValueError(f"ArrowConfig.router_temperature must be > 0, got {self.router_temperature}.")


register_coercion("arrow_config", ArrowConfig)  # a file's dict keeps only the constructor's fields


def arrow_check(config) -> None:
    """variant_table check: Arrow mixes plain LoRA experts, so it takes no other variant (HF PEFT refuses
    too)."""
    if getattr(config, "use_dora", False):
        raise ValueError(
            "arrow_config cannot be combined with use_dora=True (as in HF PEFT); turn one of them off.")


# ---------------------------------------------------------------------------------------------- the router
def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor, seed: int | None) -> torch.Tensor:
    """Unit top right-singular vector of B A (in,), by power iteration on A^T (B^T B) A without forming B A.

    Float32 throughout; the start vector is drawn from a generator seeded with `seed` (torch's global one if
    None).
    """
    a, b = a.detach().float(), b.detach().float()
    gram = b.T @ b  # (r, r)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=a.device.type)
        gen.manual_seed(int(seed))
    v = torch.randn(a.shape[1], dtype=a.dtype, device=a.device, generator=gen)
    v = v / (v.norm() + _EPS)
    for _ in range(POWER_ITERATIONS):
        w = a.T @ (gram @ (a @ v))
        v = w / (w.norm() + _EPS)
    return v


class ArrowRouter(LoraVariant):
    """The Arrow variant on a linear layer: one instance per (layer, router adapter), holding the routing
    state.

    The experts are the layer's other adapters, minus general-knowledge ones (gks_<i> or listed in
    gks_adapter_names) and other Arrow routers. The set is re-read before each forward; experts added after
    the router join (and get GenKnowSub if it already ran), and prototypes are recomputed when the set
    changes.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        arrow = config.arrow_config
        self.top_k, self.temperature, self.seed = arrow.top_k, arrow.router_temperature, arrow.rng_seed
        self.use_gks = arrow.use_gks
        self.experts = list(arrow.task_adapter_names) if arrow.task_adapter_names is not None else None
        self.general = list(arrow.gks_adapter_names or [])
        self.gks_done = False
        self.gks_pending: list[str] = []  # experts that joined after GenKnowSub ran
        self.prototypes: torch.Tensor | None = None  # (E, in)

    # -------- hooks
    def init(self, layer, name):
        if self.experts is None:
            raise ValueError(
                f"Arrow router '{name}': arrow_config.task_adapter_names is not set (it is not read back "
                "from adapter_config.json, as in HF PEFT). Build Arrow models with "
                "create_arrow_model(base_model, task_specific_adapter_paths, arrow_config), which loads the "
                "experts and sets it.")
        if self.use_gks and not self.general:
            raise ValueError(
                f"Arrow router '{name}': use_gks=True needs general-knowledge adapters (gks_adapter_names); "
                "pass general_adapter_paths to create_arrow_model or set use_gks=False.")
        self.sync_experts(layer, name)

    def contribution(self, layer, name, x, result):
        self.sync_experts(layer, name)
        self.check_layer(layer, name)
        self.general_knowledge_subtraction(layer)
        if self.prototypes is None:
            self.prototypes = self.build_prototypes(layer)
        return self.route(layer, name, x)

    def merged_weight(self, layer, name):
        raise RuntimeError(
            f"Cannot merge the Arrow router '{name}': it mixes experts per token, so no single weight "
            "stands for it (as in HF PEFT). Delete the router adapter first, or keep it unmerged.")

    def unmerged_weight(self, layer, name):
        raise RuntimeError(f"Cannot unmerge the Arrow router '{name}': it is never merged (as in HF PEFT).")

    # -------- which adapters are experts
    def expert_candidates(self, layer) -> list[str]:
        """The layer's adapters that act as experts, in the layer's order."""
        return [n for n in layer.lora_A.keys()
                if not (_GKS_NAME.fullmatch(n) or n in self.general
                        or isinstance(layer.lora_variant.get(n), ArrowRouter))]

    def sync_experts(self, layer, name) -> None:
        current = self.expert_candidates(layer)
        if sorted(current) == sorted(self.experts):
            return
        if len(current) > len(self.experts):
            self.gks_pending = [n for n in current if n not in self.experts]
        self.experts = current
        self.prototypes = None

    def check_layer(self, layer, name) -> None:
        if not self.experts:
            raise ValueError(f"Arrow router '{name}' has no expert adapters on this layer; load the task "
                             "adapters first (create_arrow_model does).")
        if self.top_k > len(self.experts):
            raise ValueError(
                f"ArrowConfig.top_k={self.top_k} exceeds the {len(self.experts)} expert adapters of "
                f"router '{name}' ({self.experts}); lower top_k or load more task adapters.")
        missing = [n for n in self.general if n not in layer.lora_A]
        if self.use_gks and missing:
            raise ValueError(
                f"Arrow router '{name}': general-knowledge adapters {missing} are not on this layer; "
                "load them (create_arrow_model's general_adapter_paths) or set use_gks=False.")

    # -------- GenKnowSub and prototypes
    @torch.no_grad()
    def general_knowledge_subtraction(self, layer) -> None:
        """Subtract the mean general A and B from the experts (all the first time, later only new ones)."""
        if not self.use_gks or (self.gks_done and not self.gks_pending):
            return
        mean_a = torch.stack([layer.lora_A[n].weight for n in self.general]).mean(0)
        mean_b = torch.stack([layer.lora_B[n].weight for n in self.general]).mean(0)
        for n in self.gks_pending if self.gks_done else self.experts:
            layer.lora_A[n].weight.data.sub_(mean_a)
            layer.lora_B[n].weight.data.sub_(mean_b)
        self.gks_done, self.gks_pending = True, []

    @torch.no_grad()
    def build_prototypes(self, layer) -> torch.Tensor:
        rows = []
        for n in self.experts:
            a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
            rows.append(top_right_singular_vector(a, b, self.seed).to(dtype=a.dtype, device=a.device))
        return torch.stack(rows)

    # -------- routing
    def route(self, layer, name, x: torch.Tensor) -> torch.Tensor:
        """sum_e c_e(x) s_e B_e A_e x per token, then the router's dropout (on the output, as HF PEFT)."""
        first = layer.lora_A[self.experts[0]].weight
        tokens = layer.cast_input(x, first.dtype).reshape(-1, x.shape[-1])  # (t, in)
        protos = self.prototypes.to(device=tokens.device, dtype=tokens.dtype)
        coeff = self.coefficients(tokens, protos)  # (t, E)
        a = torch.stack([layer.lora_A[n].weight for n in self.experts])  # (E, r, in)
        b = torch.stack([layer.lora_B[n].weight for n in self.experts])  # (E, out, r)
        scales = index_tensor([layer.scaling[n] for n in self.experts], tokens.device, tokens.dtype)
        low = torch.einsum("ti,eri->ter", tokens, a)
        per_expert = torch.einsum("ter,eor->teo", low, b) * scales.view(1, -1, 1)
        delta = torch.einsum("te,teo->to", coeff, per_expert)
        delta = layer.lora_dropout[name](delta)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])

    def coefficients(self, tokens: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """Softmax(score / T) over each token's top_k experts, 0 elsewhere; score = |<x, p_e>|."""
        scores = (tokens @ protos.T).abs()
        top, idx = torch.topk(scores, self.top_k, dim=1)
        masked = torch.full_like(scores, float("-inf")).scatter(1, idx, top)
        return torch.softmax(masked / self.temperature, dim=1)


# ------------------------------------------------------------------------------------------- building a model
def lora_layers_with(model, names: list[str]):
    """(module name, layer, adapter) for every LoRA layer of `model` that holds one of `names`."""
    for mod_name, module in model.named_modules():
        holder = getattr(module, "lora_A", None)
        if holder is None or not hasattr(module, "get_base_layer"):
            continue
        for name in names:
            if name in holder:
                yield mod_name, module, name


def check_compatible_experts(model, names: list[str]) -> tuple[list[str], int]:
    """All adapters must share one rank and adapt the same modules with the same shapes (the router stacks
    them).

    Returns (sorted last components of the adapted module names: the router's target_modules, the rank).
    """
    layout: dict[str, dict[str, tuple]] = {n: {} for n in names}
    for mod_name, module, name in lora_layers_with(model, names):
        layout[name][mod_name] = (tuple(module.lora_A[name].weight.shape),
                                  tuple(module.lora_B[name].weight.shape))
    ref_name, ref = names[0], layout[names[0]]
    ranks = {n: {a[0] for a, _ in lay.values()} for n, lay in layout.items()}
    for name in names[1:]:
        if ranks[name] != ranks[ref_name] or len(ranks[name]) != 1:
            raise ValueError(
                f"Arrow needs one LoRA rank for all adapters: '{name}' has r={sorted(ranks[name])}, "
                f"'{ref_name}' has r={sorted(ranks[ref_name])}. Retrain or pick adapters of one rank.")
        if set(layout[name]) != set(ref):
            raise ValueError(f"Arrow needs all adapters on the same modules: '{name}' adapts "
                             f"{sorted(layout[name])}, '{ref_name}' adapts {sorted(ref)} "
                             "(target_modules differ).")
        diff = [m for m in ref if layout[name][m] != ref[m]]
        if diff:
            raise ValueError(f"Arrow needs equal LoRA shapes: '{name}' differs from '{ref_name}' on {diff} "
                             f"({layout[name][diff[0]]} vs {ref[diff[0]]}).")
    if not ref:
        raise ValueError(
            f"Adapter '{ref_name}' adapts no LoRA module of the model; Arrow has nothing to route.")
    return sorted({m.rsplit(".", 1)[-1] for m in ref}), next(iter(ranks[ref_name]))


def check_linear_only(model, names: list[str]) -> None:
    """Arrow routes linear layers only (nn.Linear, nn.Conv1d, transformers' Conv1D, bitsandbytes'
    Linear4bit)."""
    offenders = [f"adapter '{name}' on '{mod_name}' ({type(module.get_base_layer()).__name__})"
                 for mod_name, module, name in lora_layers_with(model, names)
                 if not _is_linear_like(module.get_base_layer())]
    if offenders:
        raise TypeError("Arrow experts must only adapt linear layers (nn.Linear, nn.Conv1d, transformers' "
                        "Conv1D, bitsandbytes' Linear4bit); leave the others out of target_modules. Found: "
                        + "; ".join(offenders))


def _warn_unrouted(model, names: list[str]) -> None:
    """Embedding LoRAs hold lora_embedding_A/B, which Arrow (as HF PEFT) neither checks nor routes."""
    unrouted = sorted({mod_name for mod_name, module in model.named_modules()
                       for name in names if name in getattr(module, "lora_embedding_A", {})})
    if unrouted:
        logger.warning("Arrow routes linear layers only: the experts' LoRA on %s is loaded but not used (as "
                       "in HF PEFT); leave embeddings out of the experts' target_modules to silence this.",
                       unrouted)


def _is_linear_like(module) -> bool:
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
        return True
    names = {(c.__module__.split(".")[0], c.__name__) for c in type(module).__mro__}
    return bool(names & {("transformers", "Conv1D"), ("bitsandbytes", "Linear4bit")})


def _adapter_source(path: str) -> tuple[str, str | None]:
    """(model_id, subfolder) of an adapter path: a local folder, "user/repo" or "user/repo/sub/folder"."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(
                f"Local adapter path '{path}' has no adapter_config.json; pass an adapter folder.")
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return path, None


def _load_kwargs(path: str, adapter_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    model_id, subfolder = _adapter_source(path)
    kwargs = dict(adapter_kwargs)
    if subfolder is not None:
        kwargs.setdefault("subfolder", subfolder)
    return model_id, kwargs


def _load_group(model, paths: list[str], prefix: str, adapter_kwargs: dict[str, Any],
                start: int = 0) -> list[str]:
    names = []
    for i, path in enumerate(paths, start):
        model_id, kwargs = _load_kwargs(path, adapter_kwargs)
        names.append(f"{prefix}{i}")
        model.load_adapter(model_id, adapter_name=names[-1], **kwargs)
    return names


def create_arrow_model(base_model, task_specific_adapter_paths: list[str], arrow_config: ArrowConfig,
                       general_adapter_paths: list[str] | None = None, **adapter_kwargs: Any):
    """A PeftModel routing `base_model` through the given LoRA experts with Arrow (HF PEFT's signature).

    The experts load as task_0, task_1, ... (general-knowledge adapters, for use_gks=True, as gks_0, ...), and
    a router adapter "arrow_router" (same rank and target modules) is added and activated. `adapter_kwargs` go
    to every load (e.g. subfolder, revision, torch_device). Sets arrow_config.task_adapter_names
    / gks_adapter_names.
    """
    if not task_specific_adapter_paths:
        raise ValueError(
            "task_specific_adapter_paths should contain at least one adapter path (an Arrow expert).")
    if arrow_config.use_gks and not general_adapter_paths:
        raise ValueError("use_gks=True (GenKnowSub) needs general_adapter_paths: the general-knowledge LoRA "
                         "adapters to subtract; pass them or set use_gks=False.")
    first_id, first_kwargs = _load_kwargs(task_specific_adapter_paths[0], adapter_kwargs)
    model = PeftModel.from_pretrained(base_model, first_id, adapter_name=f"{TASK_PREFIX}0", **first_kwargs)
    tasks = [f"{TASK_PREFIX}0"] + _load_group(model, task_specific_adapter_paths[1:], TASK_PREFIX,
                                              adapter_kwargs, start=1)
    general = []
    if arrow_config.use_gks:
        general = _load_group(model, list(general_adapter_paths), GKS_PREFIX, adapter_kwargs)
    arrow_config.task_adapter_names, arrow_config.gks_adapter_names = tasks, general
    if arrow_config.top_k > len(tasks):
        raise ValueError(f"ArrowConfig.top_k={arrow_config.top_k} exceeds the {len(tasks)} task adapters; "
                         "lower top_k or pass more task_specific_adapter_paths.")
    check_linear_only(model, tasks + general)
    _warn_unrouted(model, tasks + general)
    target_modules, r = check_compatible_experts(model, tasks + general)
    model.add_adapter(ROUTER_NAME, LoraConfig(arrow_config=arrow_config, target_modules=target_modules, r=r))
    model.set_adapter(ROUTER_NAME)
    return model
