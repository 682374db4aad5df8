"""BOFT with boft_n_butterfly_factor > 1 against HF PEFT 0.21.2, both ways, on nn.Linear and nn.Conv2d.

HF PEFT builds N factors only with its fbd_cuda extension; here (no CUDA build) it builds one, and so does
fastpeft for every new adapter. Files with N factors are made by HF PEFT with the extension, emulated on the
CPU by `hf_with_extension` (HF's own FastBlockDiag path, fed by a PyTorch block-diagonal kernel).
"""

from __future__ import annotations

import logging

import peft
import peft.tuners.boft.layer as hf_boft_layer
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.errors import AdapterLoadError
from fastpeft.methods.boft import BOFTConfig
from oft_helpers import BOFT_MODELS, BlockDiagKernel, close

import models
from oracle_helpers import (
    ModelCaseTable,
    assert_differs,
    assert_files_both_ways,
    assert_init_like_hf,
    assert_loads_both_ways,
)


class ConvNet(nn.Module):
    """conv0 rotates in_channels * k * k = 8 * 2 * 2 = 32 inputs: room for 3 factors of 2 x 2 or 4 x 4
    blocks."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(8, 6, kernel_size=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv0(x)).mean(dim=(-1, -2)))


def make_conv():
    torch.manual_seed(5)
    return ConvNet().eval()


def conv_inputs():
    return torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(4))


LAYOUTS = {"size": dict(boft_block_size=2), "num": dict(boft_block_size=0, boft_block_num=8)}
TARGETS = {"square": ["lin0", "lin1"], "conv": ["conv0"]}  # rotated sizes 16 (Linear) and 32 (Conv2d)
CASES = {
    f"{model}-f{factors}-{layout}": (model, dict(target_modules=targets, boft_n_butterfly_factor=factors,
                                                 **LAYOUTS[layout]))
    for model, targets in TARGETS.items() for factors in (1, 2, 3) for layout in LAYOUTS
}
# HF PEFT with fbd_cuda refuses 5 factors of 2 x 2 blocks on 16 inputs; without it (here) it builds one factor
CASES["square-f5-size"] = ("square", dict(target_modules=TARGETS["square"], boft_block_size=2,
                                          boft_n_butterfly_factor=5))
BUTTERFLIES = [c for c, (_, kw) in CASES.items() if kw["boft_n_butterfly_factor"] in (2, 3)]

TABLE = ModelCaseTable(CASES, BOFTConfig, peft.BOFTConfig, scale=0.1,
                       model_table={**BOFT_MODELS, "conv": (make_conv, conv_inputs)})


@pytest.fixture
def hf_without_extension(monkeypatch):
    """HF PEFT as where fbd_cuda does not compile (this machine, any CPU one): one factor, whatever the
    config. Pinned so that a CUDA machine with ninja / nvcc runs the same comparison."""
    monkeypatch.setattr(hf_boft_layer, "get_fbd_cuda", lambda: None)


@pytest.fixture
def hf_with_extension(monkeypatch):
    """HF PEFT as on a machine where fbd_cuda compiles: N factors, block diagonals from FastBlockDiag."""
    monkeypatch.setattr(hf_boft_layer, "get_fbd_cuda", lambda: BlockDiagKernel())


def factor_counts(model) -> set[int]:
    return {p.shape[0] for n, p in model.named_parameters() if n.endswith("boft_R.default")}


def assert_hf_loads_strictly(case, folder) -> None:
    """HF PEFT (as it runs here) takes every tensor of the file in `folder`: no unexpected or missing adapter
    key."""
    hf = peft.get_peft_model(TABLE.base(case), TABLE.config(peft, case))
    result = peft.set_peft_model_state_dict(hf, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "boft_" in k], result.missing_keys


# -------------------------------------------------------------------------------------------- as HF runs here
@pytest.mark.parametrize("case", list(CASES))
def test_new_adapters_are_built_and_saved_like_hf_without_extension(case, tmp_path, hf_without_extension):
    """Same init outputs, file keys, shapes (one factor) and adapter_config.json (the factor as given)."""
    assert_init_like_hf(TABLE, case, tmp_path, close)
    assert factor_counts(TABLE.fresh(fastpeft, case)) == {1}


@pytest.mark.parametrize("case", list(CASES))
def test_files_load_both_ways_with_hf_without_extension(case, tmp_path, hf_without_extension):
    assert_loads_both_ways(TABLE, case, tmp_path, close)
    assert_hf_loads_strictly(case, tmp_path / "fastpeft_made")
    assert_hf_loads_strictly(case, tmp_path / "hf_made" / "ours")


def test_layouts_hf_refuses_are_refused(hf_without_extension):
    for extra, match in [(dict(boft_block_size=3), "divisible by boft_block_size"),
                         (dict(boft_block_size=0, boft_block_num=3), "divisible by boft_block_num")]:
        kwargs = dict(target_modules=["lin0"], boft_n_butterfly_factor=2, **extra)
        with pytest.raises(ValueError):
            peft.get_peft_model(BOFT_MODELS["square"][0](), peft.BOFTConfig(**kwargs))
        with pytest.raises(ValueError, match=match):
            fastpeft.get_peft_model(BOFT_MODELS["square"][0](), BOFTConfig(**kwargs))


def test_one_warning_per_config_names_the_single_factor(caplog):
    def butterfly_warnings():
        return [r.getMessage() for r in caplog.records if "single block-diagonal factor" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        TABLE.fresh(fastpeft, "square-f1-size")
        assert butterfly_warnings() == []
        TABLE.fresh(fastpeft, "square-f3-num")  # two target layers, one config
    [message] = butterfly_warnings()
    assert "boft_n_butterfly_factor=3" in message and "fbd_cuda" in message


# --------------------------------------------------------------------------------------------- N-factor files
@pytest.mark.parametrize("case", BUTTERFLIES)
def test_hf_files_with_extension_load_with_all_factors(case, tmp_path, hf_with_extension):
    """HF-with-fbd_cuda file -> fastpeft (N factors, same outputs: the butterfly order) -> same file -> HF."""
    theirs = TABLE.build(peft, case)
    x = TABLE.inputs(case)
    factors = CASES[case][1]["boft_n_butterfly_factor"]
    assert factor_counts(theirs) == {factors}
    assert_differs(models.forward(theirs, x), models.forward(TABLE.base(case), x))
    assert_files_both_ways(theirs, lambda: TABLE.base(case), x, tmp_path, close)
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path / "hf")).eval()
    assert factor_counts(ours) == {factors}
    models.assert_merge_roundtrip(ours, x, models.forward(theirs, x), close)


def _hf_without_extension(case, seed=2):
    """HF PEFT's one-factor build of `case`, perturbed, even inside `hf_with_extension`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_boft_layer, "get_fbd_cuda", lambda: None)
        return TABLE.build(peft, case, seed=seed)


def _three_factor_model(tmp_path):
    """fastpeft's 'square-f3-size' adapter loaded from an HF-with-extension file (3 factors), and its
    inputs."""
    case = "square-f3-size"
    TABLE.build(peft, case).save_pretrained(str(tmp_path / "three"))
    ours = fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path / "three")).eval()
    assert factor_counts(ours) == {3}
    return ours, TABLE.inputs(case)


def test_one_factor_file_loads_as_one_factor_into_an_n_factor_adapter(tmp_path, hf_with_extension):
    ours, x = _three_factor_model(tmp_path)
    hf_one = _hf_without_extension("square-f3-size")
    fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf_one))
    assert factor_counts(ours) == {1}
    close(models.forward(ours, x), models.forward(hf_one, x), "one-factor file")


@pytest.mark.parametrize("direction", ["grow", "shrink"])
def test_failed_load_of_a_resizing_file_changes_nothing(direction, tmp_path, hf_with_extension):
    """A load that resized the adapter for the file (1 -> 3 factors, or 3 -> 1) and then failed puts the old
    blocks back into the same Parameter objects: factor counts, rotation and outputs as before."""
    case = "square-f3-size"
    if direction == "grow":
        ours = models.perturb(fastpeft.get_peft_model(TABLE.base(case), TABLE.config(fastpeft, case)), seed=4,
                              scale=0.1).eval()
        state = dict(peft.get_peft_model_state_dict(TABLE.build(peft, case)))
    else:
        ours = _three_factor_model(tmp_path)[0]
        state = dict(peft.get_peft_model_state_dict(_hf_without_extension(case)))
    x = TABLE.inputs(case)
    before, counts = models.forward(ours, x), factor_counts(ours)
    params = {n: p for n, p in ours.named_parameters() if "boft_R" in n}
    del state["base_model.model.lin1.boft_s"]
    with pytest.raises(AdapterLoadError):
        fastpeft.set_peft_model_state_dict(ours, state, strict=True)
    assert factor_counts(ours) == counts
    assert all(p is params[n] for n, p in ours.named_parameters() if "boft_R" in n)
    torch.testing.assert_close(models.forward(ours, x), before, atol=0, rtol=0)


def test_n_factor_file_hf_would_refuse_is_refused_before_any_change():
    """lin0's 3 factors are valid, lin1's 5 are not (8 blocks): nothing is rebuilt, the error names the
    key."""
    case = "square-f1-num"
    ours = fastpeft.get_peft_model(TABLE.base(case), TABLE.config(fastpeft, case))
    state = {k: v for k, v in peft.get_peft_model_state_dict(_hf_without_extension(case)).items()}
    state["base_model.model.lin0.boft_R"] = torch.zeros(3, 8, 2, 2)
    state["base_model.model.lin1.boft_R"] = torch.zeros(5, 8, 2, 2)
    with pytest.raises(ValueError, match=r"lin1\.boft_R with 5 butterfly factors"):
        fastpeft.set_peft_model_state_dict(ours, state)
    assert factor_counts(ours) == {1}


def test_n_factor_file_into_a_merged_adapter_is_refused(tmp_path, hf_with_extension):
    ours = fastpeft.get_peft_model(TABLE.base("square-f3-size"), TABLE.config(fastpeft, "square-f3-size"))
    ours.base_model.merge_adapter()
    state = peft.get_peft_model_state_dict(TABLE.build(peft, "square-f3-size"))
    with pytest.raises(ValueError, match="unmerge_adapter"):
        fastpeft.set_peft_model_state_dict(ours, state)
    assert factor_counts(ours) == {1}
