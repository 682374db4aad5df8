"""`UniLoraModel`: the Uni-LoRA tuner. It owns the trained vector (`unilora_theta_d`, one entry per adapter),
assigns every layer's factor entries to entries of it once all layers are built, and reads / writes HF PEFT's
file layout: theta_d once as `base_model.unilora_theta_d`, the per-layer indices and scales only with
`save_indices`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...checkpoint.keys import write_tensor
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import (
    align_fan_in_fan_out,
    bias_file_keys,
    fill_targets,
    refuse_second_bias_adapter,
    train_base_biases,
)
from .._shared.modules import is_linear
from .layer import UniLoraLinear

THETA = "unilora_theta_d"
THETA_FILE_KEY = "base_model." + THETA  # file keys are the PeftModel's, the tuner being `base_model`

# HF PEFT reuses LoRA's default targets for Uni-LoRA
UNILORA_TARGETS = LORA_TARGETS

DISPATCH = DispatchChain("UniLoRA")
DISPATCH.register(is_linear, UniLoraLinear)


def balanced_indices(count: int, length: int, seed: int) -> torch.Tensor:
    """`count` indices into a vector of `length`, each value used floor(count / length) or that plus one
    times, in an order shuffled by `seed` (numpy's PCG64 generator, as HF PEFT: the same seed gives the same
    assignment, so files need not store it). Balanced use keeps every 1/sqrt(n_j) scale alike."""
    rng = np.random.default_rng(seed)
    values = np.repeat(np.arange(length), count // length)
    extra = count % length
    if extra:
        values = np.concatenate([values, rng.choice(length, size=extra, replace=False)])
    rng.shuffle(values)
    return torch.as_tensor(values, dtype=torch.long)


def new_theta(config) -> nn.Parameter:
    if config.init_weights:
        theta = torch.empty(config.theta_d_length)
        nn.init.uniform_(theta, -config.init_theta_d_bound, config.init_theta_d_bound)
    else:
        theta = torch.randn(config.theta_d_length)
    return nn.Parameter(theta)


class UniLoraModel(Tuner):
    dispatch = DISPATCH

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       **options) -> None:
        if THETA not in self._modules:
            self.unilora_theta_d = nn.ParameterDict()
        self.__dict__["_injecting"] = adapter_name  # read by layer_kwargs (plain attribute, not a module)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   **options)
            self._assign_indices(adapter_name, autocast_adapter_dtype)
        except Exception:
            if adapter_name in self.unilora_theta_d:
                del self.unilora_theta_d[adapter_name]
            raise

    def prepare_config(self, config, model):
        return fill_targets(config, model, UNILORA_TARGETS, "UniLoRA", is_linear)

    def check_new_adapter(self, config) -> None:
        refuse_second_bias_adapter(self.peft_config, config, "UniLoRA")

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, key)
        adapter = self.__dict__["_injecting"]
        if adapter not in self.unilora_theta_d:  # drawn before the first layer's indices, as HF PEFT
            self.unilora_theta_d[adapter] = new_theta(config)
        return {"theta_d": self.unilora_theta_d, "target_name": key}

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        train_base_biases(self, adapter_name, config.bias)

    # ------------------------------------------------------------------ the index assignment
    def _assign_indices(self, adapter_name: str, widen: bool) -> None:
        """Hand out one balanced, seeded assignment over the factor entries of every layer holding the
        adapter, in module order (A then B per layer, as HF PEFT), with scales 1/sqrt(uses of each theta_d
        entry)."""
        layers = [m for m in self.model.modules()
                  if isinstance(m, UniLoraLinear) and m.has_adapter(adapter_name)]
        config = self.peft_config[adapter_name]
        shapes = [((m.r[adapter_name], m.in_features), (m.out_features, m.r[adapter_name])) for m in layers]
        total = sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes)
        if total == 0:
            return
        indices = balanced_indices(total, config.theta_d_length, config.proj_seed)
        counts = torch.bincount(indices, minlength=config.theta_d_length)
        inv_sqrt = torch.zeros(config.theta_d_length, dtype=torch.float32)
        used = counts > 0
        inv_sqrt[used] = counts[used].float().rsqrt()
        offset = 0
        for layer, (shape_a, shape_b) in zip(layers, shapes):
            index_a = indices[offset:offset + shape_a[0] * shape_a[1]].view(shape_a)
            offset += index_a.numel()
            index_b = indices[offset:offset + shape_b[0] * shape_b[1]].view(shape_b)
            offset += index_b.numel()
            layer.set_indices(adapter_name, index_a, index_b, inv_sqrt, widen)

    # ------------------------------------------------------------------ files
    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if THETA not in self._modules or adapter_name not in self.unilora_theta_d:
            return {}
        return {THETA_FILE_KEY: self.unilora_theta_d[adapter_name].detach()}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        if THETA not in self._modules or adapter_name not in self.unilora_theta_d:
            return set()
        value, theta = tensors.get(THETA_FILE_KEY), self.unilora_theta_d[adapter_name]
        if value is None:
            raise ValueError(f"The Uni-LoRA adapter file lacks '{THETA_FILE_KEY}', the trained vector every "
                             "layer reads; it was not saved by Uni-LoRA or is damaged.")
        if tuple(value.shape) != tuple(theta.shape):
            raise ValueError(f"Uni-LoRA tensor '{THETA_FILE_KEY}' has shape {tuple(value.shape)} in the file "
                             f"but {tuple(theta.shape)} in the model: theta_d_length differs from the "
                             "adapter_config.json it was saved with.")
        with torch.no_grad():
            write_tensor(theta, value)
        return {THETA_FILE_KEY}
