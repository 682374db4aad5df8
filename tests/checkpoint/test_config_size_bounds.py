"""Size checks of a loaded adapter_config.json against the base model (checkpoint/config_values.py) must not
refuse adapters HF PEFT loads.

Two false refusals fixed here:
- FourierFT's n_frequency counts spectral entries of a whole in x out weight, so it may exceed every single
  dimension (the FourierFT paper uses n = 10000 on ViT-Base, whose largest dimension is 3072); it was bounded
  by the largest dimension.
- Under DeepSpeed ZeRO-3 every parameter is a shape-(0,) placeholder with its real shape in `ds_shape`, so the
  bound fell to its floor (1024) and refused e.g. trainable token ids of a 128k vocabulary.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.checkpoint.config_values import check_config_for_model  # noqa: E402
from fastpeft.errors import AdapterConfigError  # noqa: E402


class Square(nn.Module):
    """Largest dimension 128, largest weight 128 x 128 = 16384 entries."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(128, 128)
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        return self.head(self.lin(x))


def _model() -> Square:
    torch.manual_seed(0)
    return Square().eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 128, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("hf_saves", [True, False])
def test_fourierft_with_more_frequencies_than_any_dimension_loads_both_ways(tmp_path, hf_saves):
    src, dst = (peft, fastpeft) if hf_saves else (fastpeft, peft)
    torch.manual_seed(1)
    saved = src.get_peft_model(_model(),
                               src.FourierFTConfig(n_frequency=2000, scaling=50.0, target_modules=["lin"]))
    with torch.no_grad():
        for name, param in saved.named_parameters():
            if "fourierft_spectrum" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    saved.save_pretrained(str(tmp_path))
    want = saved.eval()(_x())
    for lib in (dst, src):
        loaded = lib.PeftModel.from_pretrained(_model(), str(tmp_path)).eval()
        torch.testing.assert_close(loaded(_x()), want)


def test_fourierft_n_frequency_beyond_the_largest_weight_is_still_refused(tmp_path):
    peft.get_peft_model(_model(),
                        peft.FourierFTConfig(n_frequency=100, target_modules=["lin"])).save_pretrained(
        str(tmp_path))
    config = fastpeft.PeftConfig.from_pretrained(str(tmp_path))
    config.n_frequency = 128 * 128 + 1
    with pytest.raises(AdapterConfigError, match="n_frequency"):
        check_config_for_model(config, _model(), tmp_path)


def _zero3_placeholders(model: nn.Module) -> nn.Module:
    """What DeepSpeed ZeRO-3 leaves in each rank's module: empty tensors, the real shape in `ds_shape`."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            empty = nn.Parameter(torch.empty(0), requires_grad=param.requires_grad)
            empty.ds_shape, empty.ds_numel = param.shape, param.numel()
            module._parameters[name] = empty
    return model


def test_sizes_under_zero3_placeholders_use_the_real_shapes(tmp_path):
    torch.manual_seed(0)
    big_vocab = nn.Sequential(nn.Embedding(5000, 16), nn.Linear(16, 16))
    peft.get_peft_model(big_vocab,
                        peft.TrainableTokensConfig(target_modules=["0"], token_indices=[4000, 4999])
                        ).save_pretrained(str(tmp_path))
    config = fastpeft.PeftConfig.from_pretrained(str(tmp_path))
    check_config_for_model(config, big_vocab, tmp_path)  # the full model
    check_config_for_model(config, _zero3_placeholders(big_vocab), tmp_path)  # and its ZeRO-3 placeholders
    config.token_indices = [5000]
    with pytest.raises(AdapterConfigError, match="token_indices"):
        check_config_for_model(config, big_vocab, tmp_path)


# The central lists of size-like field names that checkpoint/config_values.py kept before each config field
# declared its own bound (metadata "size"): every registered config field of these names must still be
# bounded, with the same kind of bound.
OLD_SIZE_FIELDS = {
    "r", "init_r", "target_r", "mini_r", "num_virtual_tokens", "token_dim", "num_layers",
    "num_attention_heads", "num_transformer_submodules", "encoder_hidden_size", "encoder_num_layers",
    "n_frequency", "num_vectors", "vector_length", "oft_block_size", "boft_block_size", "boft_block_num",
    "boft_n_butterfly_factor", "adapter_len", "adapter_layers", "num_tasks", "n_tasks", "n_skills",
    "n_splits", "num_ranks", "decompose_factor", "topk", "num_cayley_neumann_terms",
}
OLD_MATRIX_SIZE_FIELDS = {"n_frequency"}
OLD_SIZE_DICT_FIELDS = {"rank_pattern"}
OLD_INDEX_FIELDS = {"trainable_token_indices", "token_indices"}


def _old_kind(name: str) -> str | None:
    if name in OLD_MATRIX_SIZE_FIELDS:
        return "matrix"
    if name in OLD_SIZE_FIELDS:
        return "dim"
    return "dim_values" if name in OLD_SIZE_DICT_FIELDS else "token_ids" if name in OLD_INDEX_FIELDS else None


# fields named like a formerly listed one whose method bounds them otherwise, with the reason
OTHER_BOUNDS = {
    ("OSFConfig", "rank_pattern"): "values may be fractions of a layer's rank (as effective_rank); OSF "
                                   "checks each against its layer before any allocation",
}


def test_every_formerly_listed_size_field_still_declares_its_bound():
    from fastpeft.config import SIZE_KINDS, declared
    from fastpeft.registry import registered

    checked, wrong = 0, []
    for spec in registered().values():
        kinds = declared(spec.config_cls, "size")
        assert set(kinds.values()) <= set(SIZE_KINDS), (spec.config_cls.__name__, kinds)
        for field in dataclasses.fields(spec.config_cls):
            want = None if (spec.config_cls.__name__, field.name) in OTHER_BOUNDS else _old_kind(field.name)
            checked += want is not None
            if want is not None and kinds.get(field.name) != want:
                wrong.append(f"{spec.config_cls.__name__}.{field.name}: "
                             f"{kinds.get(field.name)!r}, not {want!r}")
    assert not wrong, wrong
    assert checked > 40  # every method's rank, the prompt dims, ...
