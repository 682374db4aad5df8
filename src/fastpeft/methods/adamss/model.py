"""`AdamssModel`: the AdaMSS tuner (nn.Linear targets; HF PEFT's default-target table) and ASA, its adaptive
subspace allocation (`update_and_allocate`, called each step by the user or by `AdamssAsaCallback`).

ASA (as HF PEFT 0.21): from init_warmup to final_warmup every step folds the gradients into each subspace's
importance EMAs; every mask_interval steps in that window the subspaces of all layers are ranked by score and
all but the schedule's budget stop training (requires_grad off, gradient dropped), then the scores restart.
The budget decays from all subspaces to asa_target_subspaces (exponent asa_schedule_exponent).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import fill_targets, linear_targets_checked
from .._shared.importance import decayed_budget
from .._shared.modules import is_linear
from .layer import AdamssLayer, Linear

DISPATCH = DispatchChain("AdaMSS")
DISPATCH.register(nn.Linear, Linear)

# as HF PEFT: LoRA's table, plus ViT's query / value
ADAMSS_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "vit": ["query", "value"]}
SVD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_decomposable(weight: torch.Tensor, where: str) -> None:
    """AdaMSS builds its subspaces from the weight's values (SVD, k-means): they must be real floats."""
    if weight.is_meta:
        raise ValueError(f"AdaMSS cannot adapt '{where}': its weight is on the meta device, and the "
                         "subspaces are built from an SVD of the weight's values. Load the base model's "
                         "weights first.")
    if weight.dtype not in SVD_DTYPES:
        raise TypeError(f"AdaMSS cannot adapt '{where}': its subspaces come from an SVD of the weight, which "
                        f"needs floating values, not {weight.dtype} (a quantised layer?).")


class AdamssModel(Tuner):
    """Adds AdaMSS adapters to a model's nn.Linear layers ('all-linear' also selects Conv1D layers, as HF
    PEFT, which AdaMSS then refuses by name)."""

    dispatch = DISPATCH

    def prepare_config(self, config, model):
        return fill_targets(config, model, ADAMSS_TARGETS, "AdaMSS", is_linear)

    def layer_kwargs(self, config, key, module):
        return {"target_name": key}

    def select_targets(self, model, config):
        """The targets, each checked before any layer is built: its weight can be decomposed."""
        return linear_targets_checked(super().select_targets(model, config),
                                      lambda base, name: check_decomposable(base.weight, name))

    def _place_adapter(self, layer, adapter_name: str, autocast: bool) -> None:
        """V^T follows the adapter's dtype as in HF PEFT: the base's dtype, widened to float32 with
        autocast_adapter_dtype on a half-precision base (so files hold the same dtypes)."""
        super()._place_adapter(layer, adapter_name, autocast)
        buffers = layer.adamss_newB
        if adapter_name not in buffers:
            return
        weight = layer.get_base_layer().weight
        widen = autocast and weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if widen else weight.dtype
        buffers[adapter_name] = buffers[adapter_name].to(weight.device, dtype)

    # ------------------------------------------------------------------ ASA
    def asa_layers(self, adapter_name: str) -> list[AdamssLayer]:
        return [m for m in self.model.modules()
                if isinstance(m, AdamssLayer) and adapter_name in m.exp_avg_ipt_A]

    def total_subspaces(self, adapter_name: str) -> int:
        return sum(m.num_subspaces[adapter_name] for m in self.model.modules()
                   if isinstance(m, AdamssLayer) and adapter_name in m.num_subspaces)

    def update_and_allocate(self, global_step: int) -> None:
        """Call once per optimizer step, after loss.backward() and before optimizer.zero_grad() (the
        gradients are read). Does nothing for adapters without use_asa."""
        for name in self.active_adapters:
            config = self.peft_config[name]
            layers = self.asa_layers(name) if config.use_asa else []
            if not layers or not config.init_warmup <= global_step <= config.final_warmup:
                continue
            for layer in layers:
                layer.update_importance(name, config.asa_importance_beta, config.asa_uncertainty_beta)
            if global_step % config.mask_interval == 0:
                budget = decayed_budget(global_step, config.init_warmup, config.final_warmup,
                                        self.total_subspaces(name), config.asa_target_subspaces,
                                        config.asa_schedule_exponent)
                self._keep_best_subspaces(name, layers, budget)
                for layer in layers:
                    layer.reset_importance(name)

    @staticmethod
    def _keep_best_subspaces(adapter_name: str, layers: list[AdamssLayer], budget: int) -> None:
        """Of the subspaces scored in this window (over all layers), those scoring above the budget-th
        highest score keep training; the others stop. Unscored ones (already pruned) are left as they are."""
        scored = [(layer, i, score) for layer in layers for i, score in layer.subspace_scores(adapter_name)]
        if not scored:
            return
        if budget >= len(scored):
            threshold = float("-inf")
        else:
            scores = torch.stack([s for _, _, s in scored])
            threshold = -torch.kthvalue(-scores, budget)[0].item()
        for layer, i, score in scored:
            layer.set_subspace_active(adapter_name, i, float(score) > threshold)
