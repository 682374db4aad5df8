"""`FrodModel`: the FRoD tuner. It builds, per module role ("category": `self_attn_q_proj`, ...), the basis
V shared by that role's layers and the positions of the sparse S, owns them as buffers (file keys
`base_model.frod_V.<role>`, `base_model.frod_s_indices.<role>`, `base_model.frod_s_size.<role>`) and hands
each layer plain references."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.dispatch import DispatchChain
from ...core.layer import AdapterLayer
from ...integrations.transformers_defaults import LORA_TARGETS
from .._shared.common import (
    align_fan_in_fan_out,
    bias_file_keys,
    fill_targets,
    refuse_second_bias_adapter,
    train_base_biases,
)
from .._shared.modules import is_conv1d, is_linear
from .._shared.random_projections import BufferDict
from .._shared.tuners import StoresBuiltOnInjection
from .layer import FrodLinear

logger = logging.getLogger(__name__)

DISPATCH = DispatchChain("FRoD")
DISPATCH.register(is_linear, FrodLinear)

# as HF PEFT: VeRA's table (LoRA's, phi on its attention projections) plus ViT
FROD_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"], "vit": ["query", "value"]}

STORES = ("frod_V", "frod_s_indices", "frod_s_size")
FILE_PREFIX = "base_model."


def category_of(key: str) -> str:
    """The role a module plays in its block, from its dotted name: `layers.0.self_attn.q_proj` ->
    `self_attn_q_proj`; BERT's `attention.output.dense` -> `attention_output` (apart from the MLP's
    `output.dense`)."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def block_index(key: str, fallback: int) -> int:
    """The block index: the number after a `layers` component, else the first numeric component, else
    `fallback` (the target's position among the targets)."""
    parts = key.split(".")
    if "layers" in parts:
        at = parts.index("layers") + 1
        if at < len(parts) and parts[at].isdigit():
            return int(parts[at])
    return next((int(p) for p in parts if p.isdigit()), fallback)


def shared_basis(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """V (in, in) for a role's weights W_i (out_i, in), float32. Fewer stacked rows than columns: the right
    singular vectors of [W_1; ...; W_n]. Otherwise QR of the stack, Q = [Q_1; ...; Q_n], and V = R^T E with E
    the eigenvectors of mean_i (Q_i^T Q_i + alpha I)^-1 (the ridge keeps correlated layers invertible)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    mean_inv = torch.zeros((dim, dim), dtype=r.dtype)
    start = 0
    for matrix in matrices:  # summed in order, as HF PEFT (same rounding)
        q_i = q[start: start + matrix.shape[0]]
        start += matrix.shape[0]
        mean_inv += torch.linalg.inv(q_i.T @ q_i + alpha * torch.eye(dim, dtype=r.dtype))
    mean_inv /= len(matrices)
    return r.T @ torch.linalg.eigh(mean_inv)[1]


def sparse_positions(dim: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2, nnz) row / column indices of S: a random draw of int(dim^2 * rate) off-diagonal positions (at least
    one when rate > 0), in the order of a permutation of the row-major off-diagonal list."""
    off_diag = dim * dim - dim
    nnz = min(int(dim * dim * rate), off_diag)
    if rate > 0 and off_diag > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    k = torch.randperm(off_diag, generator=generator)[:nnz]
    # row i holds dim - 1 off-diagonal entries, its columns skipping i
    rows = k // (dim - 1)
    cols = k % (dim - 1)
    cols = cols + (cols >= rows).long()
    return torch.stack([rows, cols]).contiguous()


class FrodModel(StoresBuiltOnInjection):
    """Adds FRoD adapters to nn.Linear / Conv1D layers."""

    dispatch = DISPATCH
    base_file_keys = staticmethod(bias_file_keys)  # the biases `bias` trains are saved with the adapter

    def prepare_config(self, config, model):
        if config.runtime_offload_base_weight:
            raise ValueError("FRoD: runtime_offload_base_weight=True (base weights kept on the CPU while "
                             "unused) is not implemented in fastpeft; set it to False (same outputs).")
        return fill_targets(config, model, FROD_TARGETS, "FRoD", is_linear)

    def check_new_adapter(self, config) -> None:
        refuse_second_bias_adapter(self.peft_config, config, "FRoD")
        for name, other in self.peft_config.items():
            if other is config:
                continue
            for option in ("projection_prng_key", "save_projection"):
                if getattr(other, option) != getattr(config, option):
                    raise ValueError(
                        f"FRoD adapters of one model must share {option}: adapter '{name}' has "
                        f"{getattr(other, option)!r}, the new one {getattr(config, option)!r}.")

    def mark_extra_trainable(self, adapter_name: str, config) -> None:
        train_base_biases(self, adapter_name, config.bias, skip=(".original_module.",))

    # ------------------------------------------------------------------ the shared bases
    def _has_projections(self, adapter_name: str) -> bool:
        return any(adapter_name in store for store in self._role_stores("frod_V"))

    def _role_weights(self, targets) -> dict[str, list[torch.Tensor]]:
        """role -> (out, in) float32 weights in block order. As HF PEFT, one weight per (block, role): a later
        target with the same block index and role replaces an earlier one."""
        blocks: dict[int, dict[str, torch.Tensor]] = {}
        fallback = 0
        for key, module in targets:
            base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
            if not is_linear(base):
                continue
            if base.weight.is_meta:
                raise ValueError(f"FRoD cannot adapt '{key}': its weight is on the meta device, and the "
                                 "shared basis is built from the weights' values. Load the weights first.")
            if not base.weight.is_floating_point():
                raise TypeError(f"FRoD cannot adapt '{key}': its weight is {base.weight.dtype} (a quantised "
                                "layer?), and the shared basis and U are solved from real floating values.")
            weight = base.weight.T if is_conv1d(base) else base.weight
            blocks.setdefault(block_index(key, fallback), {})[category_of(key)] = weight
            fallback += 1
        roles: dict[str, list[torch.Tensor]] = {}
        for index in sorted(blocks):
            for role, weight in blocks[index].items():
                roles.setdefault(role, []).append(weight)
        return roles

    def _add_projections(self, adapter_name: str, config, targets) -> None:
        roles = self._role_weights(targets)
        for attr in STORES:
            if attr not in self._modules:
                self.add_module(attr, nn.ModuleDict())
        if roles and all(role in self._modules["frod_V"] for role in roles):
            self._reuse_projections(adapter_name, config, roles)
            return
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        for role in sorted(roles):
            weights = roles[role]
            matrices = [w.detach().to(device="cpu", dtype=torch.float32) for w in weights]
            v = shared_basis(matrices, config.regularization_alpha).to(dtype=weights[0].dtype)
            positions = sparse_positions(v.shape[0], config.sparse_rate, generator)
            size = torch.tensor([v.shape[0], v.shape[0]], dtype=torch.long)
            for attr, tensor in zip(STORES, (v, positions, size)):
                stores = self._modules[attr]
                if role not in stores:
                    stores[role] = BufferDict(persistent=config.save_projection)
                stores[role][adapter_name] = tensor

    def _reuse_projections(self, adapter_name: str, config, roles) -> None:
        """As HF PEFT: an adapter added to roles that have bases already shares the first adapter's bases and
        S positions (the same tensors); its own sparse_rate and regularization_alpha do not apply there."""
        for role in roles:
            first = next(iter(self._modules["frod_V"][role]))
            source = self.peft_config.get(first)
            changed = [o for o in ("sparse_rate", "regularization_alpha")
                       if source is not None and getattr(source, o) != getattr(config, o)]
            if changed:
                logger.warning("FRoD adapter '%s' reuses the bases and S positions of adapter '%s' for '%s' "
                               "(as HF PEFT): its %s are not used there.", adapter_name, first, role,
                               " / ".join(changed))
            for attr in STORES:
                store = self._modules[attr][role]
                store[adapter_name] = store[first]

    def _role_stores(self, attr: str):
        return list(self._modules[attr].values()) if attr in self._modules else []

    def _drop_projections(self, adapter_name: str) -> None:
        for attr in STORES:
            for store in self._role_stores(attr):
                if adapter_name in store:
                    del store[adapter_name]

    def layer_kwargs(self, config, key: str, module: nn.Module) -> dict:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        role = category_of(key)
        return {"projections": tuple(self._modules[attr][role] for attr in STORES), "target_name": key,
                "fan_in_fan_out": align_fan_in_fan_out(config, base, key) if is_linear(base) else False}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_projections(adapter_name)

    # ------------------------------------------------------------------ adapter files
    def _file_keys(self, adapter_name: str) -> dict[str, tuple[str, str]]:
        """{file key: (store, role)} of the bases and S positions of `adapter_name`."""
        keys = {}
        for attr in STORES:
            roles = self._modules[attr] if attr in self._modules else {}
            for role, store in roles.items():
                if adapter_name in store:
                    keys[f"{FILE_PREFIX}{attr}.{role}"] = (attr, role)
        return keys

    def extra_file_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if not self.peft_config[adapter_name].save_projection:
            return {}
        return {key: self._modules[attr][role][adapter_name].detach()
                for key, (attr, role) in self._file_keys(adapter_name).items()}

    def load_extra_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
        keys = self._file_keys(adapter_name)
        found = sorted(k for k in tensors if k.startswith(tuple(f"{FILE_PREFIX}{a}." for a in STORES)))
        if not self.peft_config[adapter_name].save_projection:
            if found:
                logger.warning("The file holds %s but save_projection=False: the FRoD bases are rebuilt from "
                               "the base weights instead.", found)
            return set()
        if not found:
            raise ValueError("The adapter file holds no FRoD bases (base_model.frod_V.*), but its config "
                             "says save_projection=True. Set save_projection to False (adapter_config.json) "
                             "to rebuild them from the base weights.")
        unknown = [k for k in found if k not in keys]
        if unknown:
            raise ValueError(f"The adapter file holds FRoD tensors {unknown} for module roles this model's "
                             "targets do not have. Nothing was loaded.")
        for key in found:
            target = self._modules[keys[key][0]][keys[key][1]][adapter_name]
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise ValueError(f"'{key}' has shape {tuple(tensors[key].shape)} in the file but "
                                 f"{tuple(target.shape)} in the model: the adapter was made for other target "
                                 "layers or another sparse_rate. Nothing was loaded.")
        with torch.no_grad():
            for key in found:
                target = self._modules[keys[key][0]][keys[key][1]][adapter_name]
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
        for layer in self.adapter_layers():  # U must be solved for the V that was loaded
            if isinstance(layer, FrodLinear) and layer.has_adapter(adapter_name):
                layer.rebuild_u(adapter_name)
        return set(found)
