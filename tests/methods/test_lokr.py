"""LoKr against HF PEFT 0.21.2: config and files both ways, every factor layout (full / low-rank W1 and W2, CP
kernels), outputs, gradients, dropout in training, merging, several adapters, errors. HF PEFT is the
oracle."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.methods.lokr import LoKrConfig
from fastpeft.methods.lokr.layer import factorization

import models
from oracle_helpers import (
    ModelCaseTable,
    assert_dropout_draws_like_hf,
    assert_dropout_never_merged,
    assert_init_like_hf,
    assert_loads_both_ways,
    assert_merges_like_hf,
    assert_same_config_json,
    assert_same_training_step,
    assert_two_adapters_like_hf,
)

ATOL = 1e-5


class WideConv2d(nn.Module):
    """Channels wide enough (16 / 32) that a small r factors W2, so the CP kernel form is used."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(32, 16, kernel_size=3, stride=2)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.conv1(torch.relu(self.conv0(x))).mean(dim=(-1, -2)))


class TallConv2d(WideConv2d):
    """A (3, 1) kernel: its CP-rebuilt W2 has a unit dim (HF PEFT 0.21.2's LoKr forward crashes on it)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(32, 16, kernel_size=(3, 1), stride=2)


class WideConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv1d(16, 32, kernel_size=3, padding=1)
        self.conv1 = nn.Conv1d(32, 16, kernel_size=2, groups=2)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.conv1(torch.relu(self.conv0(x))).mean(dim=-1))


def _seeded_factory(cls):
    def make():
        torch.manual_seed(models.SEED)
        return cls().eval()
    return make


MODELS = {
    **models.MODELS,
    "wide2d": (_seeded_factory(WideConv2d),
               lambda: torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(5))),
    "wide1d": (_seeded_factory(WideConv1d),
               lambda: torch.randn(2, 16, 9, generator=torch.Generator().manual_seed(6))),
    "tall2d": (_seeded_factory(TallConv2d),
               lambda: torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(5))),
}

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=1, alpha=2)),  # W1 full, W2 = W2a @ W2b
    "mlp_full_w2": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, alpha=8)),
    "mlp_both_lycoris": ("mlp", dict(target_modules=["lin0", "lin1"], r=1, decompose_both=True,
                                     init_weights="lycoris")),
    "mlp_factor": ("mlp", dict(target_modules=["lin0", "lin1"], r=1, decompose_factor=2, init_weights=False)),
    "conv1d_full_w2": ("conv1d", dict(target_modules=["conv0", "conv1"], r=8, alpha=4)),  # 3-D W2 kernel
    "conv2d": ("conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=2, alpha=4)),
    "wide2d": ("wide2d", dict(target_modules=["conv0", "conv1"], r=2, decompose_both=True)),
    "wide2d_effective": ("wide2d", dict(target_modules=["conv0", "conv1"], r=1, decompose_both=True,
                                        use_effective_conv2d=True)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=2, alpha=4)),  # default targets (q_proj, v_proj)
    "bert_patterns": ("bert_cls", dict(task_type="SEQ_CLS", target_modules=["query", "value", "dense"], r=2,
                                       rank_pattern={"value": 8}, alpha_pattern={"query": 7},
                                       decompose_factor=4)),
}
# CP-factored kernels with a unit dim (every Conv1d, Conv2d with a (k, 1) kernel): HF 0.21.2 builds and saves
# these adapters but its forward / merge crash in torch.kron; fastpeft is checked against HF's own factor math
# instead
HF_CRASHES = {
    "wide1d_effective": ("wide1d", dict(target_modules=["conv0", "conv1"], r=1, use_effective_conv2d=True)),
    "tall2d_effective": ("tall2d", dict(target_modules=["conv1"], r=1, decompose_both=True,
                                        use_effective_conv2d=True)),
}
CASES.update(HF_CRASHES)
HF_CASES = [c for c in CASES if c not in HF_CRASHES]


TABLE = ModelCaseTable(CASES, LoKrConfig, peft.LoKrConfig, scale=0.3, model_table=MODELS)
build, inputs, base = TABLE.build, TABLE.inputs, TABLE.base


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def saved(path):
    return load_file(str(path / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------- config, math
def test_factorization_matches_hf():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    for dim in range(1, 150):
        for factor in (-1, 1, 2, 3, 4, 6, 8, 16):
            assert factorization(dim, factor) == hf_factorization(dim, factor), (dim, factor)


def test_config_fields_defaults_and_json_match_hf(tmp_path):
    assert set(LoKrConfig().to_dict()) == set(peft.LoKrConfig().to_dict())
    kw = dict(r=3, alpha=5, rank_dropout=0.2, module_dropout=0.1, use_effective_conv2d=True,
              decompose_both=True, decompose_factor=4, rank_dropout_scale=True, init_weights="lycoris",
              target_modules="lin.*", rank_pattern={"a": 2}, alpha_pattern={"b": 7}, exclude_modules=["head"])
    assert_same_config_json(LoKrConfig(**kw), peft.LoKrConfig(**kw), tmp_path)
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "hf"))
    assert (isinstance(loaded, LoKrConfig) and loaded.init_weights == "lycoris"
            and loaded.decompose_factor == 4)
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "ours")).rank_dropout_scale is True


# --------------------------------------------------------------------------------------------- init and files
@pytest.mark.parametrize("case", list(CASES))
def test_init_and_saved_files_match_hf(case, tmp_path):
    """Same seed -> the same factors and layout (which of W1 / W2 are factored), bitwise the same file tensors
    and the same adapter_config.json."""
    identity = bool(TABLE.config(fastpeft, case).init_weights)
    assert_init_like_hf(TABLE, case, tmp_path, close, identity, hf_runs=case not in HF_CRASHES)
    assert any(".lokr_w1" in k for k in saved(tmp_path / "ours"))


def test_cases_cover_every_factor_layout():
    kinds = set()
    for case in CASES:
        model = fastpeft.get_peft_model(base(case), TABLE.config(fastpeft, case))
        kinds |= {n.split(".")[-2] for n, _ in model.named_parameters() if ".lokr_" in n}
    assert kinds == {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


@pytest.mark.parametrize("case", HF_CASES)
def test_adapter_files_load_both_ways(case, tmp_path):
    assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", list(HF_CRASHES))
def test_unit_dim_cp_kernels_where_hf_crashes(case, tmp_path):
    """HF saves the adapter; fastpeft loads it and adds exactly dW = scale * kron(W1, CP(t2, W2a, W2b))
    rebuilt with HF's own functions (on contiguous copies), per layer and in the model output."""
    from peft.tuners.lokr.layer import make_kron, make_weight_cp

    hf = build(peft, case)
    hf.save_pretrained(str(tmp_path))
    with pytest.raises(RuntimeError):  # the HF bug this case documents
        models.forward(hf, inputs(case))
    fp = fastpeft.PeftModel.from_pretrained(base(case), str(tmp_path)).eval()
    expected_model = base(case)
    for name in CASES[case][1]["target_modules"]:
        layer = getattr(hf.base_model.model, name)
        w1 = layer.lokr_w1["default"] if "default" in layer.lokr_w1 else (
            layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"])
        w2 = make_weight_cp(layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"])
        w2 = torch.empty(w2.shape).copy_(w2)
        target = getattr(expected_model, name)
        delta = make_kron(w1, w2, layer.scaling["default"]).reshape(target.weight.shape).detach()
        close(getattr(fp.base_model.model, name).delta_weight("default"), delta, f"dW {name}")
        with torch.no_grad():
            target.weight += delta
    close(models.forward(fp, inputs(case)), models.forward(expected_model, inputs(case)), "output")
    fp.save_pretrained(str(tmp_path / "fp"))
    assert set(saved(tmp_path / "fp")) == set(saved(tmp_path))


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("case", ["mlp_both_lycoris", "conv1d_full_w2", "wide2d_effective", "llama"])
def test_gradients_match_hf(case):
    assert_same_training_step(build(fastpeft, case), build(peft, case), inputs(case), close)


@pytest.mark.parametrize("case, scale", [("mlp", False), ("wide2d_effective", True), ("bert_patterns", True)])
def test_dropout_in_training_matches_hf_under_the_same_seed(case, scale):
    """rank_dropout (with / without rank_dropout_scale) and module_dropout draw the same random numbers as
    HF."""
    extra = dict(rank_dropout=0.5, module_dropout=0.3, rank_dropout_scale=scale)
    fp, hf = build(fastpeft, case, **extra), build(peft, case, **extra)
    assert_dropout_draws_like_hf(fp, hf, inputs(case), close, seeds=range(3))


def test_dropout_is_never_merged_and_eval_is_deterministic():
    extra = dict(rank_dropout=0.9, module_dropout=0.9, rank_dropout_scale=True)
    fp, hf = build(fastpeft, "wide2d", **extra), build(peft, "wide2d", **extra)
    assert_dropout_never_merged(fp, hf, inputs("wide2d"), close, targets=("conv0", "conv1"))


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("case",
                         ["mlp_full_w2", "conv1d_full_w2", "conv2d", "wide2d_effective", "bert_patterns"])
def test_merge_unmerge_and_unload_match_hf(case):
    assert_merges_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close, safe_merge=True)


# ------------------------------------------------------------------------------------------------ adapters
def test_two_adapters_set_disable_delete_match_hf(tmp_path):
    other = dict(r=1, use_effective_conv2d=True, init_weights="lycoris")
    assert_two_adapters_like_hf(TABLE, "wide2d", other, tmp_path, close)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, words", [
    (dict(r=-2), "positive integer"),
    (dict(decompose_factor=0), "decompose_factor"),
    (dict(decompose_factor=2.5), "decompose_factor"),
    (dict(rank_dropout=2), "rank_dropout"),
    (dict(init_weights="gaussian"), "init_weights"),
])
def test_bad_config_is_refused_clearly(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LoKrConfig(target_modules=["lin0"], **kwargs)


def test_unsupported_module_is_refused():
    with pytest.raises(ValueError, match="LoKr cannot wrap module 'c_fc'.*Conv1D.*target_modules"):
        fastpeft.get_peft_model(models.make_conv1d_gpt2(), LoKrConfig(target_modules=["c_fc"]))
