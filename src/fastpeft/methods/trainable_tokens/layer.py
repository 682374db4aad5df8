"""`TrainableTokensLayer`: new values for a few rows of an embedding (or tied output head) weight, per
adapter.

`TrainableTokensWrapper` holds such a layer as `token_adapter`, the layout HF PEFT uses for LoRA's
`trainable_token_indices` (file keys `<embedding>.token_adapter.trainable_tokens_delta`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...core.auxiliary import AuxiliaryTrainingWrapper
from ...core.layer import AdapterLayer
from .config import check_index_list

ROW_LAYERS = (nn.Embedding, nn.Linear)  # weight rows are tokens: embedding rows / output-head rows


class TrainableTokensLayer(AdapterLayer):
    """Per adapter: `token_indices[name]` and their trained rows `trainable_tokens_delta[name]` (k, dim).

    Forward replaces those rows and leaves all others untouched; merge writes them into the base weight. A
    layer built with `tied_to` (an output head sharing the input embedding's weight) shares that layer's rows.
    """

    adapter_param_names = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None,
                 tied_to: TrainableTokensLayer | None = None, save_tied: bool = True) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, ROW_LAYERS):
            raise ValueError(
                "Trainable tokens replace rows of nn.Embedding / nn.Linear weights; got "
                f"{type(base_layer).__name__}. Point target_modules (or trainable_token_indices) "
                "at an embedding layer.")
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        self.save_tied = save_tied  # tied copies are written to files by the method (as HF PEFT), not by LoRA
        self._merged_rows: dict[str, torch.Tensor] = {}
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
        self.update_layer(adapter_name, config)

    @property
    def tied_to(self) -> TrainableTokensLayer | None:
        return self._tied[0] if self._tied else None

    @property
    def vocab_size(self) -> int:
        return self.base_layer.weight.shape[0]

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        if self.tied_to is not None:
            return  # rows, indices and their training all come from the layer this one is tied to
        indices = list(config.token_indices)
        check_index_list(indices, "token_indices")
        out_of_range = [i for i in indices if i >= self.vocab_size]
        if out_of_range:
            raise ValueError(
                f"Token index {out_of_range[0]} is out of range for an embedding with vocabulary size "
                f"{self.vocab_size} (valid ids: 0..{self.vocab_size - 1}); resize the token embeddings first "
                "(model.resize_token_embeddings) if you added tokens.")
        weight = self.base_layer.weight
        if config.init_weights:
            rows = weight.detach()[indices].clone()
        else:
            rows = torch.randn(len(indices), weight.shape[1], dtype=weight.dtype, device=weight.device)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows)

    def adapter_tensors(self, name: str):
        if self.tied_to is not None and not self.save_tied:
            return iter(())
        return self.adapter_parameters(name)

    # ------------------------------------------------------------------ forward
    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], dtype=torch.long, device=device)

    def _rows(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.trainable_tokens_delta[name].to(dtype)

    def _check_disjoint(self, names: Iterable[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(names):
            overlap = seen.intersection(self.token_indices[name])
            if overlap:
                raise ValueError(
                    f"Adapter '{name}' trains token ids {sorted(overlap)[:10]} that another active or merged "
                    "adapter of this layer also trains; only adapters with disjoint token "
                    "ids can be combined.")
            seen.update(self.token_indices[name])

    def add_adapters(self, result: torch.Tensor, x: torch.Tensor, names: Iterable[str], *args, **kwargs):
        names = [n for n in names if n in self.trainable_tokens_delta]
        if len(names) > 1:
            self._check_disjoint(names)
        for name in names:
            result = self.replace_rows(result, x, name)
        return result

    def replace_rows(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """`result` (the base output for `x`) with adapter `name`'s rows in place of the base rows."""
        index = self._index(name, result.device)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            slot = torch.full((self.vocab_size,), -1, dtype=torch.long, device=x.device)
            slot[index.to(x.device)] = torch.arange(len(index), device=x.device)
            pos = slot[x]
            rows = self._rows(name, base.weight.dtype)[pos.clamp(min=0)]
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (e.g. Gemma) scale their output
            if scale is not None:
                rows = rows * torch.as_tensor(scale, dtype=rows.dtype, device=rows.device)
            return torch.where((pos >= 0).unsqueeze(-1), rows.to(result.dtype), result)
        bias = base.bias[index] if base.bias is not None else None
        cols = F.linear(x, self._rows(name, base.weight.dtype), bias)
        return result.index_copy(-1, index, cols.to(result.dtype))

    def mixed_forward(self, x, *args, adapter_names: list[str], **kwargs):
        self.check_mixed_batch(x, adapter_names)
        result = self.base_forward(x, *args, **kwargs)
        for name in sorted(set(adapter_names) & set(self.trainable_tokens_delta)):
            idx = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=result.device)
            result = result.index_copy(0, idx, self.replace_rows(result[idx], x[idx], name))
        return result

    # ------------------------------------------------------------------ merging
    def _writes_shared_weight(self) -> bool:
        """A tied layer whose weight is the source's own tensor leaves writing to the source layer."""
        return self.tied_to is None or self.base_layer.weight is not self.tied_to.base_layer.weight

    def leaves_shared_weight(self, name: str) -> bool:
        return not self._writes_shared_weight()

    def delta_weight(self, name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        delta = torch.zeros_like(weight)
        index = self._index(name, weight.device)
        delta[index] = self._rows(name, weight.dtype) - weight[index]
        return delta

    def merge_one(self, name: str, safe_merge: bool) -> None:
        self._check_disjoint(self.merged_adapters + [name])
        if not self._writes_shared_weight():
            return
        rows = self._rows(name, self.base_layer.weight.dtype).detach()
        if safe_merge and not torch.isfinite(rows).all():
            raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems to be broken.")
        weight = self.base_layer.weight.data
        index = self._index(name, weight.device)
        self._merged_rows[name] = weight[index].clone()
        weight.index_copy_(0, index, rows)

    def unmerge_one(self, name: str) -> None:
        original = self._merged_rows.pop(name, None)
        if original is None:
            return
        weight = self.base_layer.weight.data
        weight.index_copy_(0, self._index(name, weight.device), original.to(weight))


class TrainableTokensWrapper(AuxiliaryTrainingWrapper):
    """Holds a `TrainableTokensLayer` as `token_adapter` (HF PEFT's layout for LoRA's
    trainable_token_indices).

    The inner layer is itself an adapter holder, so the tuner activates, merges, saves and unloads it
    directly; the wrapper forwards calls and collapses to the plain module on unload.
    """

    def __init__(self, module: nn.Module, adapter_name: str, config=None,
                 tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, adapter_name, config, tied_to=tied_to,
                                                  save_tied=False)

    def update(self, adapter_name: str, config) -> None:
        self.token_adapter.update_layer(adapter_name, config)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """transformers' loader: the file's `token_adapter.trainable_tokens_delta` fills this adapter's delta.
        A wrapper tied to another one's rows (an output head) has no key of its own in files."""
        inner = self.token_adapter
        if not isinstance(inner, TrainableTokensLayer) or inner.tied_to is not None:
            return {}
        if adapter_name not in inner.trainable_tokens_delta:
            return {}
        key = "token_adapter.trainable_tokens_delta"
        return {key: f"{key}.{adapter_name}"}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(self.original_module, name)  # e.g. num_embeddings, embedding_dim, padding_idx

    @property
    def original_module(self) -> nn.Module:
        inner = self.token_adapter
        return inner.get_base_layer() if isinstance(inner, AdapterLayer) else inner

    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward uses: base rows with the active adapters' rows in place (as HF PEFT)."""
        inner = self.token_adapter
        weight = self.original_module.weight
        if not isinstance(inner, TrainableTokensLayer) or inner.disable_adapters or inner.merged:
            return weight
        for name in inner.active_adapters:
            if name in inner.trainable_tokens_delta:
                weight = weight.index_copy(0, inner._index(name, weight.device),
                                           inner._rows(name, weight.dtype))
        return weight

    def forward(self, x, *args, **kwargs):
        return self.token_adapter(x, *args, **kwargs)

    def adapter_names(self) -> set[str]:
        inner = self.token_adapter
        return inner.adapter_names() if isinstance(inner, AdapterLayer) else set()

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())  # the inner layer reports its own parameters

    def set_adapter(self, names: str | list[str], trainable: Iterable[str] | None = None,
                    inference_mode: bool = False) -> None:
        pass  # the tuner reaches the inner layer directly

    def enable_adapters(self, enabled: bool) -> None:
        pass

    def delete_adapter(self, name: str) -> None:
        pass

    def unloaded(self, merge: bool, safe_merge: bool = False,
                 adapter_names: list[str] | None = None) -> nn.Module:
        inner = self.token_adapter
        if isinstance(inner, AdapterLayer):  # not yet unloaded by the tuner (it unloads inner holders first)
            return inner.unloaded(merge, safe_merge=safe_merge, adapter_names=adapter_names)
        return inner
