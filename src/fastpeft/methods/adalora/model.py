"""`AdaLoraModel`: injects AdaLoRA's SVD layers, adds the orthogonality regulariser to the loss and runs the
rank allocation schedule (`update_and_allocate`, called each step by the user or by `AdaLoraCallback`).

The callback is passed to transformers' Trainer explicitly (`callbacks=[AdaLoraCallback()]`): fastpeft does
not patch the Trainer to attach it. Forgetting both is caught: a training forward past `tinit` steps without
any allocation raises an error naming the fix (see `_count_training_step`).

Files are HF PEFT's: `ranknum` is not saved; an adapter whose config holds a `rank_pattern` is saved with only
the kept triplets (lora_A rows, lora_E entries, lora_B columns) and is shrunk to those ranks when loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import GEMMA4
from ...quant.merge import AllOrNothingMerge, register_quantised
from .._shared.common import bias_file_keys, fill_targets
from .._shared.modules import is_linear
from ..lora.model import LoraModel
from .allocator import RankAllocator
from .bnb import SVDLinear4bit, SVDLinear8bitLt
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear

DISPATCH = DispatchChain("AdaLoRA")
DISPATCH.register(nn.Conv2d, SVDConv2d)
DISPATCH.register(is_linear, SVDLinear)
register_quantised(DISPATCH, SVDLinear4bit, SVDLinear8bitLt)  # bitsandbytes layers first

_QV = ["q_proj", "v_proj"]
_FULL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# default target_modules per transformers model_type (HF PEFT 0.21.2's AdaLoRA table)
ADALORA_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": _FULL,
    "opt": _FULL,
    **{t: ["c_attn"] for t in ("gpt2", "gpt_bigcode")},
    **{t: ["query_key_value"] for t in ("bloom", "gpt_neox")},
    **{t: _QV for t in ("gptj", "gpt_neo", "llama", "llama4", "gemma", "gemma2", "gemma3_text",
                        "qwen2", "qwen3")},
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma4": GEMMA4,
}

# PeftModel.base_model is this tuner and tuner.model the user's model: adapter file keys start with this
FILE_PREFIX = "base_model.model."


def _module_path(pattern_key: str, adapter_name: str) -> str:
    """'<path>.lora_E[.<adapter>]' (a rank_pattern key) -> '<path>'."""
    if pattern_key.endswith(f".{adapter_name}"):
        pattern_key = pattern_key[: -len(adapter_name) - 1]
    return pattern_key[: -len(".lora_E")] if pattern_key.endswith(".lora_E") else pattern_key


class AdaLoraModel(AllOrNothingMerge, Tuner):
    """AdaLoRA tuner. At most one adapter trains (others must be loaded with inference_mode=True), as HF
    PEFT."""

    dispatch = DISPATCH
    layer_family = AdaLoraLayer

    def __init__(self, model, peft_config, adapter_name="default", **kwargs) -> None:
        self.__dict__["trainable_adapter_name"] = None
        self.__dict__["rankallocator"] = None
        self.__dict__["_schedule"] = {"ran": False, "steps_unscheduled": 0}
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # ------------------------------------------------------------------ injection
    def prepare_config(self, config, model):
        return fill_targets(config, model, ADALORA_TARGETS, "AdaLoRA", is_linear)

    def check_new_adapter(self, config) -> None:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError(
                f"AdaLoRA trains one adapter at a time, but adapters {trainable} are all trainable: create "
                "every adapter but the one to train with inference_mode=True (or load them with "
                "is_trainable=False)."
            )

    def layer_kwargs(self, config, key, module):
        kwargs = {"r": config.init_r}
        if is_linear(module):
            kwargs["fan_in_fan_out"] = LoraModel._fan_in_fan_out(config, module, key)
        return kwargs

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, **options):
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **options)
        config = self.peft_config[adapter_name]
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.svd_layers(adapter_name), config, adapter_name)
            self._schedule.update(ran=False, steps_unscheduled=0)

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        LoraModel.mark_extra_trainable(self, adapter_name, config)  # the `bias` option, as for LoRA

    def svd_layers(self, adapter_name: str) -> dict[str, AdaLoraLayer]:
        """Module path (inside the user's model) -> AdaLoRA layer holding `adapter_name`, in model order."""
        return {name: m for name, m in self.model.named_modules()
                if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.rankallocator = None

    def add_weighted_adapter(self, *args, **kwargs):
        raise TypeError(
            "AdaLoraModel does not support add_weighted_adapter; convert the adapters to LoRA first.")

    # ------------------------------------------------------------------ forward: orthogonality regulariser
    # called directly (model.base_model(...)): same loss as through PeftModel
    def forward(self, *args, **kwargs):
        return self.model_forward(*args, **kwargs)

    def model_forward(self, *args, **kwargs):
        self._count_training_step()
        outputs = super().model_forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self.trainable_adapter_name is not None:
            weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
            outputs.loss = loss + weight * self.orthogonal_regularizer()
        return outputs

    def orthogonal_regularizer(self) -> torch.Tensor | float:
        """Mean over the trainable adapter's A and B of ||A A^T - I||_F and ||B^T B - I||_F (paper eq. 4)."""
        name = self.trainable_adapter_name
        terms = []
        for layer in self.svd_layers(name).values():
            for gram in (layer.lora_A[name] @ layer.lora_A[name].T,
                         layer.lora_B[name].T @ layer.lora_B[name]):
                eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                terms.append(torch.norm(gram - eye, p="fro"))
        return sum(terms) / len(terms) if terms else 0.0

    def _count_training_step(self) -> None:
        """Before the schedule first runs: count training steps (forwards that find the gradients cleared, so
        gradient accumulation counts once) and refuse to go past `tinit` without update_and_allocate."""
        name = self.trainable_adapter_name
        if name is None or self._schedule["ran"] or not (self.training and torch.is_grad_enabled()):
            return
        probe = next((m.lora_E[name] for m in self.svd_layers(name).values() if m.lora_E[name].numel()), None)
        if probe is None or (probe.grad is not None and bool(probe.grad.any())):
            return  # a further micro-batch of the same step
        self._schedule["steps_unscheduled"] += 1
        tinit = self.peft_config[name].tinit
        if self._schedule["steps_unscheduled"] > tinit + 1:
            raise RuntimeError(
                f"AdaLoRA adapter '{name}' has trained {self._schedule['steps_unscheduled'] - 1} steps "
                f"(tinit={tinit}) but its rank allocation never ran, so no rank is ever pruned. Call "
                "model.base_model.update_and_allocate(global_step) every step after optimizer.step() and "
                "before optimizer.zero_grad(), or pass callbacks=[fastpeft.AdaLoraCallback()] to "
                "transformers' Trainer."
            )

    # ------------------------------------------------------------------ rank allocation
    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and masks for step `global_step` (0-based); call once per optimizer step,
        after optimizer.step() and before zero_grad(). Sets the config's rank_pattern when it masks."""
        if self.rankallocator is None:
            raise RuntimeError(
                "update_and_allocate() needs a trainable AdaLoRA adapter; this model's adapters are all in "
                "inference mode (load with is_trainable=True, or set_adapter(name) to train one)."
            )
        self._schedule["ran"] = True
        config = self.peft_config[self.trainable_adapter_name]
        final_start = config.total_step - config.tfinal
        if global_step < final_start:
            _, pattern = self.rankallocator.update_and_allocate(global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == final_start:
            _, config.rank_pattern = self.rankallocator.update_and_allocate(global_step, force_mask=True)
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(config.rank_pattern)

    # ------------------------------------------------------------------ files
    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Replaces the saved A / E / B of a pruned adapter by their kept triplets; as HF PEFT, strips the
        adapter name from the config's rank_pattern keys (the form written to adapter_config.json)."""
        config = self.peft_config[adapter_name]
        if not config.rank_pattern:
            return {}
        config.rank_pattern = {k.replace(f".{adapter_name}", ""): v for k, v in config.rank_pattern.items()}
        out = {}
        for pattern_key, flags in config.rank_pattern.items():
            path = _module_path(pattern_key, adapter_name)
            layer = self.model.get_submodule(path)
            if layer.lora_A[adapter_name].shape[0] == sum(flags):  # already shrunk (loaded pruned)
                continue
            keep = torch.tensor(flags, dtype=torch.bool, device=layer.lora_E[adapter_name].device)
            for part, value in (("lora_A", layer.lora_A[adapter_name][keep]),
                                ("lora_E", layer.lora_E[adapter_name][keep]),
                                ("lora_B", layer.lora_B[adapter_name][:, keep])):
                out[f"{FILE_PREFIX}{path}.{part}"] = value.detach()
        return out

    def convert_loaded_state(self, adapter_name, tensors, root):
        """Before loading a pruned adapter: shrink its layers to the ranks kept by the config's
        rank_pattern."""
        config = self.peft_config.get(adapter_name)
        for pattern_key, flags in (getattr(config, "rank_pattern", None) or {}).items():
            layer = self.model.get_submodule(_module_path(pattern_key, adapter_name))
            if layer.r[adapter_name] == len(flags):
                layer.keep_triplets(adapter_name, list(flags))
        return tensors
