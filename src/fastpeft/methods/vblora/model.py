"""`VBLoRAModel`: the VB-LoRA tuner. It owns the shared vector bank (`vblora_vector_bank`, one entry per
adapter) and writes / reads HF PEFT's file layout: the bank once as `base_model.vblora_vector_bank`, the
logits per layer, or with `save_only_topk_weights` each logits tensor as `<key>_topk_indices` and
`<key>_topk_weights`."""

from __future__ import annotations

import torch
from torch import nn

from ...checkpoint.keys import write_tensor
from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...core.tuner import Tuner
from ...integrations.transformers_defaults import GEMMA4
from .._shared.common import align_fan_in_fan_out, bias_file_keys, fill_targets, train_base_biases
from .._shared.modules import is_linear
from .layer import LOGIT_NAMES, VBLoRALinear

BANK = "vblora_vector_bank"
FILE_PREFIX = "base_model."  # file keys are those of the PeftModel's state dict, the tuner being `base_model`
MODEL_PREFIX = FILE_PREFIX + "model."

_QV = ["q_proj", "v_proj"]
VBLORA_TARGETS: dict[str, list[str] | str] = {
    **{t: _QV for t in ("gptj", "gpt_neo", "llama", "llama4", "gemma", "gemma2", "gemma3_text",
                        "qwen2", "qwen3")},
    **{t: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"] for t in ("bart", "opt")},
    **{t: ["c_attn"] for t in ("gpt2", "gpt_bigcode")},
    **{t: ["query_key_value"] for t in ("bloom", "gpt_neox")},
    **{t: ["query", "value"] for t in ("bert", "roberta")},
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma4": GEMMA4,
}

DISPATCH = DispatchChain("VBLoRA")
DISPATCH.register(is_linear, VBLoRALinear)


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type HF PEFT uses for top-k indices into a bank of `num_vectors`."""
    for bound, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < bound:
            return dtype
    return torch.int64


def topk_form(logits: torch.Tensor, topk: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the compact file form; the last weight is left out (they sum to one)."""
    top, indices = logits.detach().topk(topk)
    weights = torch.softmax(top, dim=-1)[..., :-1].contiguous()
    return indices.to(index_dtype(num_vectors)), weights


def logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Logits with the same top-k softmax as the saved form: log-weights at the indices, -inf elsewhere."""
    full_weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    logits = torch.full((*weights.shape[:-1], num_vectors), float("-inf"), dtype=full_weights.dtype,
                        device=weights.device)
    return logits.scatter(-1, indices.long(), torch.log(full_weights))


class VBLoRAModel(Tuner):
    dispatch = DISPATCH

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       **options) -> None:
        if BANK not in self._modules:
            self.vblora_vector_bank = nn.ParameterDict()
        try:
            super().inject_adapter(model, adapter_name,
                                   autocast_adapter_dtype=autocast_adapter_dtype, **options)
        except Exception:
            if adapter_name in self.vblora_vector_bank:
                del self.vblora_vector_bank[adapter_name]
            raise

    def prepare_config(self, config, model):
        return fill_targets(config, model, VBLORA_TARGETS, "VBLoRA", is_linear)

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        if not isinstance(module, AdapterLayer):
            align_fan_in_fan_out(config, module, key)
        return {"vector_bank": self.vblora_vector_bank}

    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def mark_extra_trainable(self, adapter_name, config):
        train_base_biases(self, adapter_name, config.bias)

    # ------------------------------------------------------------------ files
    def _logit_params(self, adapter_name: str):
        """(file key without suffix, parameter) of every logits tensor of `adapter_name`."""
        for path, module in self.model.named_modules():
            if isinstance(module, VBLoRALinear) and adapter_name in module.adapter_names():
                for attr in LOGIT_NAMES:
                    yield f"{MODEL_PREFIX}{path}.{attr}", getattr(module, attr)[adapter_name]

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.vblora_vector_bank:
            return {}
        config = self.peft_config[adapter_name]
        out = {}
        if config.save_only_topk_weights:
            for key, logits in self._logit_params(adapter_name):
                out[key + "_topk_indices"], out[key + "_topk_weights"] = topk_form(
                    logits, config.topk, config.num_vectors)
        out[FILE_PREFIX + BANK] = self.vblora_vector_bank[adapter_name].detach()
        return out

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        """The bank, and in top-k mode the logits rebuilt from their top-k form; every shape checked before
        writing."""
        if adapter_name not in self.vblora_vector_bank:
            return set()
        config = self.peft_config[adapter_name]
        bank_key = FILE_PREFIX + BANK
        used = {bank_key}
        missing = [] if bank_key in tensors else [bank_key]
        writes = [(bank_key, tensors.get(bank_key), self.vblora_vector_bank[adapter_name])]
        if config.save_only_topk_weights:
            for key, param in self._logit_params(adapter_name):
                writes.append((key, self._saved_logits(key, tensors, config.num_vectors, used, missing),
                               param))
        if missing:
            raise ValueError(
                f"The VB-LoRA adapter file lacks {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                "it does not match this model or its save_only_topk_weights setting.")
        for key, value, param in writes:
            self._check_shape(key, value, param)
        with torch.no_grad():
            for _, value, param in writes:
                write_tensor(param, value)
        return used

    @staticmethod
    def _saved_logits(key: str, tensors: dict, num_vectors: int, used: set,
                      missing: list) -> torch.Tensor | None:
        """Logits `key` from the file: stored whole (accepted too, as HF PEFT does), or as top-k indices
        / weights."""
        if key in tensors:
            used.add(key)
            return tensors[key]
        parts = [key + "_topk_indices", key + "_topk_weights"]
        absent = [k for k in parts if k not in tensors]
        if absent:
            missing.extend(absent)
            return None
        used.update(parts)
        return logits_from_topk(tensors[parts[0]], tensors[parts[1]], num_vectors)

    @staticmethod
    def _check_shape(key: str, value: torch.Tensor, param: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"VB-LoRA tensor '{key}' has shape {tuple(value.shape)} in the file but "
                             f"{tuple(param.shape)} in the model: the adapter was made for a different base "
                             "model or different r / num_vectors / vector_length.")

    # ------------------------------------------------------------------ parameter counts (HF PEFT's helpers)
    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """(VB-LoRA parameters saved, in float32 equivalents; other trainable parameters saved), as HF PEFT
        counts: logits and banks of all adapters; the top-k form costs topk - 1 weights plus topk indices per
        sub-vector."""
        config = self.peft_config[adapter]
        logits = bank = others = 0
        for name, param in self.named_parameters():
            if "vblora_logits" in name:
                logits += param.numel()
            elif BANK in name:
                bank += param.numel()
            elif param.requires_grad:
                others += param.numel()
        if not config.save_only_topk_weights:
            return bank + logits, others
        index_size = torch.empty(0, dtype=index_dtype(config.num_vectors)).element_size() / 4
        tiles = logits / config.num_vectors
        return int(bank + tiles * (config.topk - 1) + tiles * config.topk * index_size), others

    def print_savable_parameters(self) -> None:
        vblora, others = self.get_nb_savable_parameters()
        print(f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} "
              f"|| total params to-be-saved: {(vblora + others):,d}")
