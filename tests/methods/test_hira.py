"""HiRA (W0 modulated by a rank-r product) against HF PEFT: files both ways, init, gradients, dropout,
merging from the kept W0, several adapters, HF PEFT 0.21's rank_pattern rule, mixed batches, bf16, errors.
(Rows hira-* of tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.methods.hira import HiraConfig, HiraLayer

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": table_row("hira-mlp"),
    "mlp_gaussian_dropout": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], init_weights="gaussian",
                                         hira_dropout=0.3)),
    "mlp_random": ("mlp", dict(r=2, target_modules=["lin1"], init_weights=False)),
    "gpt2_conv1d": table_row("hira-gpt2-conv1d"),
    "llama": table_row("hira-llama"),  # default targets: q_proj, v_proj
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", r=2, target_modules="all-linear")),
    "emb": table_row("hira-embedding"),
    "conv1d": table_row("hira-conv1d"),
    "conv2d": table_row("hira-conv2d"),
    "conv3d": table_row("hira-conv3d"),
    "conv2d_dropout": ("conv2d", dict(r=2, target_modules=["conv0"], hira_dropout=0.3)),
}
TABLE = oh.CaseTable(CASES, HiraConfig, peft.HiraConfig, scale=0.3, init_seed=0)
LAYER_CASES = ["mlp", "gpt2_conv1d", "llama", "emb", "conv1d", "conv2d", "conv3d"]


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    oh.assert_saves_like_hf(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "emb", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("init", [True, "gaussian", False, None])
def test_init_matches_hf(case, init):
    """The same global RNG state -> bit-identical factors (A Kaiming / normal 1/r, B zeros; embeddings A
    zeros, B normal; convolutions take 'gaussian' as True; False / None standard normal); True and 'gaussian'
    are a no-op."""
    fresh = TABLE.fresh(fastpeft, case, init_weights=init)
    oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(fresh),
                              peft.get_peft_model_state_dict(TABLE.fresh(peft, case, init_weights=init)))
    if init in (True, "gaussian"):
        x = TABLE.inputs(case)
        close(models.forward(fresh.eval(), x), models.forward(TABLE.base(case), x), "identity at init")


def test_update_is_the_hadamard_product_with_w0():
    """The paper's update: base(x) + x (W0 * B A)^T, so a zero entry of W0 stays zero after merging."""
    model = TABLE.build(fastpeft, "mlp")
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.base_layer.weight[0, :3] = 0
    x = torch.randn(4, 20)
    a, b = layer.hira_A["default"], layer.hira_B["default"]
    w0 = layer.base_layer.weight
    close(layer(x), x @ (w0 + w0 * (b @ a)).T + layer.base_layer.bias, "forward")
    layer.merge()
    assert torch.equal(layer.base_layer.weight[0, :3], torch.zeros(3))


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "emb", "conv2d", "conv3d"])
def test_training_step_gradients_match_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_gradients_like_hf(fp, hf, TABLE.inputs(case), close, "hira_")


@pytest.mark.parametrize("case", ["mlp_gaussian_dropout", "conv2d_dropout"])
def test_dropout_draws_like_hf(case):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_dropout_draws_like_hf(fp, hf, TABLE.inputs(case), close, seeds=[0, 1, 2])


@pytest.mark.parametrize("case", LAYER_CASES + ["mlp_gaussian_dropout"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = oh.same_adapter_pair(TABLE, case)
    oh.assert_merges_like_hf(fp, hf, TABLE.inputs(case), close, safe_merge=safe)


def with_other(lib, case, **other):
    """oh.build_with_other, with adapter 'other' moved off its init too (its keys end in '.other': a
    ParameterDict entry)."""
    model = oh.build_with_other(TABLE, lib, case, **other)
    models.perturb(model, 5, TABLE.scale, wanted=lambda n: n.endswith(".other"))
    return model.eval()


@pytest.mark.parametrize("case", ["mlp", "emb", "conv2d"])
def test_two_active_adapters_match_hf(case):
    """Each active set as HF PEFT; merging both computes each update from W0 (HF PEFT's merged weights)."""
    theirs, ours = (with_other(lib, case, r=2) for lib in (peft, fastpeft))
    x = TABLE.inputs(case)
    assert all(p.abs().max() > 0 for n, p in ours.named_parameters() if n.endswith(".other"))
    with theirs.disable_adapter(), ours.disable_adapter():
        close(models.forward(ours, x), models.forward(theirs, x), "disabled")
    oh.assert_adapter_sets_like_hf(ours, theirs, x, close, merged_keeps_outputs=True)
    oh.assert_merges_like_hf(ours, theirs, x, close)


def test_unmerge_restores_w0_bit_for_bit_after_merges_one_by_one():
    """Both adapters merged in turn are computed from W0 (as HF PEFT); unmerging puts W0 back exactly."""
    model = with_other(fastpeft, "mlp", r=2)
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    x = TABLE.inputs("mlp")
    expected = models.forward(model, x)
    model.base_model.merge_adapter(["default"])
    model.base_model.merge_adapter(["other"])
    close(models.forward(model, x), expected, "merged one by one")
    model.base_model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("case", ["mlp", "emb", "conv2d"])
def test_mixed_batch_runs_each_row_with_its_adapter(case):
    model = with_other(fastpeft, case, r=2)
    x = TABLE.inputs(case)[:2]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__"], close)
    oh.assert_mixed_batch_rows(model, x, ["default", "other"], close)


def test_rank_pattern_reaches_only_adapters_added_to_hira_layers(tmp_path, caplog):
    """HF PEFT 0.21 builds new layers with r whatever rank_pattern says, and uses rank_pattern for a second
    adapter on a layer it already wrapped: the same shapes here (so files load both ways), with a warning."""
    kwargs = dict(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2})
    shapes = {}
    for lib in (fastpeft, peft):
        cls = HiraConfig if lib is fastpeft else peft.HiraConfig
        model = lib.get_peft_model(models.make_mlp(), cls(**kwargs))
        model.add_adapter("other", cls(**kwargs))
        shapes[lib] = {n: tuple(p.shape) for n, p in model.named_parameters() if "hira_" in n}
    assert shapes[fastpeft] == shapes[peft]
    assert shapes[fastpeft]["base_model.model.lin1.hira_A.default"] == (4, 20)
    assert shapes[fastpeft]["base_model.model.lin1.hira_A.other"] == (2, 20)
    assert "rank_pattern gives r=2 for 'lin1'" in caplog.text


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"),
    (dict(hira_dropout=1.5), "hira_dropout"),
    (dict(init_weights="kaiming"), "init_weights"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=".*lin.*", layers_pattern="layers"), "layers_pattern"),
    (dict(rank_pattern=[("lin0", 2)]), "rank_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiraConfig(**kwargs)


def test_bad_rank_from_pattern_names_the_layer_and_leaves_the_model_untouched():
    model = fastpeft.get_peft_model(models.make_mlp(), HiraConfig(r=2, target_modules=["lin0", "lin1"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oh.assert_add_adapter_refused(model, "other", HiraConfig(r=2, target_modules=["lin0", "lin1"],
                                                             rank_pattern={"lin1": 0}),
                                  "r must be a positive integer, got 0 for 'lin1'")
    oh.assert_same_state_dict(model.state_dict(), before)


class _Convs(nn.Module):
    def __init__(self, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, **conv_kwargs)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(-1, -2)))


@pytest.mark.parametrize("conv_kwargs,match", [
    (dict(groups=2), "HiRA cannot adapt 'conv': Conv2d with groups=2"),
    (dict(padding=1, padding_mode="circular"), "HiRA cannot adapt 'conv': padding_mode='circular'"),
])
def test_convolutions_it_cannot_modulate_are_refused_before_anything_is_built(conv_kwargs, match):
    model = _Convs(**conv_kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=match):
        fastpeft.get_peft_model(model, HiraConfig(r=2, target_modules=["lin", "conv"]))
    assert not any(isinstance(m, HiraLayer) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


def test_unsupported_layer_types_are_refused():
    with pytest.raises(ValueError, match="HiRA cannot wrap module 'mha'"):
        fastpeft.get_peft_model(models.make_mha(), HiraConfig(r=2, target_modules=["mha"]))


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), HiraConfig(r=2))


@pytest.mark.parametrize("case", ["mlp_random", "gpt2_conv1d"])
@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_hf(case, autocast, tmp_path):
    """fp32 adapters with autocast_adapter_dtype, else the base's dtype; outputs, merge and files as HF
    PEFT."""
    oh.assert_bf16_base_like_hf(TABLE, case, autocast_adapter_dtype=autocast)
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(TABLE.base(case).to(torch.bfloat16), TABLE.config(lib, case),
                                   autocast_adapter_dtype=autocast)
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


@pytest.mark.parametrize("case", ["mlp_gaussian_dropout", "llama"])
def test_config_json_matches_hf(case, tmp_path):
    ours, theirs = (TABLE.fresh(lib, case) for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


@pytest.mark.parametrize("case", ["mlp", "emb", "conv2d"])
def test_low_cpu_mem_usage_load_and_oversize_r_in_file(case, tmp_path):
    """Factors built on the meta device get the file's values; an r no model could hold is refused from the
    config file before anything is allocated."""
    model, x = TABLE.build(fastpeft, case), TABLE.inputs(case)
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"HiraConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(TABLE.base(case), str(tmp_path))


def test_get_delta_weight_is_hf_peft_modulation():
    """`get_delta_weight` keeps HF PEFT's meaning (B A in the weight's layout, not W0 * B A)."""
    hf, fp = oh.same_adapter_pair(TABLE, "gpt2_conv1d")
    ours, theirs = fp.base_model.model.c_fc, hf.base_model.model.c_fc
    close(ours.get_delta_weight("default"), theirs.get_delta_weight("default"), "get_delta_weight")


# ---------------------------------------------------------------------------- bitsandbytes 4 / 8-bit layers
QUANT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quant_config(lib, **extra):
    return lib.HiraConfig(**{"r": 4, "target_modules": QUANT_TARGETS, "init_weights": False, **extra})


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    import quantised_models as qm

    return qm.save_llama(tmp_path_factory.mktemp("llama64"))


def _quantised_pair(folder, bits: int):
    """(fastpeft, HF PEFT) HiRA on the same quantised tiny Llama, HF's perturbed adapter copied into ours."""
    import quantised_models as qm

    torch.manual_seed(0)
    theirs = models.perturb(peft.get_peft_model(qm.load_quantised(folder, bits), _quant_config(peft)), 1, 0.1)
    ours = fastpeft.get_peft_model(qm.load_quantised(folder, bits), _quant_config(fastpeft))
    result = fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert not result.missing_keys and not result.unexpected_keys
    return ours, theirs


def _dense_hf_copy(ours, theirs):
    """HF PEFT's HiRA (theirs' adapter) on the float32 tiny Llama whose linear weights are those of `ours`'s
    bitsandbytes layers, dequantised."""
    import quantised_models as qm
    from fastpeft.quant import bnb as qbnb

    qm.logits(ours)  # bitsandbytes' CPU kernel repacks 4-bit weights on first use
    dense = qm.make_llama()
    with torch.no_grad():
        for name, module in ours.get_base_model().named_modules():
            base = module.get_base_layer() if isinstance(module, HiraLayer) else module
            if qbnb.bnb_kind(base) is not None and "base_layer" not in name:
                dense.get_submodule(name).weight.copy_(qbnb.dequantize_weight(base))
    model = peft.get_peft_model(dense, _quant_config(peft))
    peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(theirs))
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_layers_train_run_and_save_like_hf(llama_folder, bits, tmp_path):
    """The training step as HF PEFT (before bitsandbytes' CPU 4-bit kernel repacks the weights on the first
    eval forward), eval logits near HF PEFT's HiRA on a dense copy of the dequantised model (8-bit: HF PEFT's
    own), files both ways.
    After that repack HF PEFT's own dequantisation of the packed weight goes wrong on the CPU (another tensor,
    in bf16), so its 4-bit eval outputs are not the reference."""
    import quantised_models as qm

    ours, theirs = _quantised_pair(llama_folder, bits)
    assert {type(m).__name__ for m in ours.base_model.adapter_layers()} == {
        "Linear4bit" if bits == 4 else "Linear8bitLt"}
    out, grads = oh.assert_same_training_step(ours, theirs, qm.inputs(), close)
    assert any("hira_B" in n and g.abs().max() > 0 for n, g in grads.items())
    ours.eval(), theirs.eval()
    dense = _dense_hf_copy(ours, theirs).eval()
    logits, reference = qm.logits(ours), qm.logits(dense)
    with dense.disable_adapter():
        effect = (reference - qm.logits(dense)).abs().max()
    # the quantised base computes within ~0.3 % of the adapter's effect from its dense copy (4-bit CPU kernel,
    # int8 activations)
    assert effect > 0.1 and (logits - reference).abs().max() < 0.01 * effect
    if bits == 8:
        close(logits, qm.logits(theirs), "logits vs HF")
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained(str(tmp_path / "ours"))
    oh.assert_same_files(tmp_path / "ours", tmp_path / "hf")
    loaded = fastpeft.PeftModel.from_pretrained(qm.load_quantised(llama_folder, bits), str(tmp_path / "hf"))
    close(qm.logits(loaded.eval()), logits, "HF file -> fastpeft")
    back = peft.PeftModel.from_pretrained(qm.load_quantised(llama_folder, bits), str(tmp_path / "ours"))
    oh.assert_same_state_dict(peft.get_peft_model_state_dict(back), fastpeft.get_peft_model_state_dict(ours))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_merge_requantises_under_the_policy_and_unmerges_exactly(llama_folder, bits):
    import quantised_models as qm
    from fastpeft.errors import LossyMergeError

    ours, _ = _quantised_pair(llama_folder, bits)
    expected = qm.logits(ours)
    before = {id(m): m.get_base_layer().weight.data.clone() for m in ours.base_model.adapter_layers()}
    with pytest.raises(LossyMergeError, match="HiRA layer"):
        ours.base_model.merge_adapter(max_merge_error=0.0)
    assert not any(layer.merged for layer in ours.base_model.adapter_layers())
    ours.base_model.merge_adapter(allow_lossy_merge=True)
    merged = qm.logits(ours)
    with ours.disable_adapter():
        plain = qm.logits(ours)  # disabling unmerges
    assert (merged - expected).norm() < (0.5 if bits == 4 else 0.05) * (expected - plain).norm()
    assert all(torch.equal(m.get_base_layer().weight.data, before[id(m)])
               for m in ours.base_model.adapter_layers())
    close(qm.logits(ours), expected, "unmerged")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_merge_and_unload_dequantized_matches_hf_dense_merge(llama_folder, bits):
    """merge_and_unload(dequantize=True): dense layers holding HF PEFT's own dense merge of the dequantised
    weights (W0 + W0 * B A)."""
    import quantised_models as qm
    from fastpeft.quant import bnb as qbnb

    ours, theirs = _quantised_pair(llama_folder, bits)
    qm.logits(ours)  # bitsandbytes' CPU kernel repacks 4-bit weights on first use
    dense = qm.make_llama()
    names = [n for n, _ in ours.get_base_model().named_modules() if n.endswith(tuple(QUANT_TARGETS))]
    with torch.no_grad():
        for name in names:
            layer = ours.get_base_model().get_submodule(name).get_base_layer()
            dense.get_submodule(name).weight.copy_(qbnb.dequantize_weight(layer))
    hf_dense = peft.get_peft_model(dense, _quant_config(peft))
    peft.set_peft_model_state_dict(hf_dense, peft.get_peft_model_state_dict(theirs))
    expected = hf_dense.merge_and_unload()
    merged = ours.merge_and_unload(dequantize=True)
    for name in names:
        assert type(merged.get_submodule(name)) is torch.nn.Linear
        close(merged.get_submodule(name).weight, expected.get_submodule(name).weight, name)


def test_quantised_mixed_batch_rows(llama_folder):
    """Per-row adapter_names on 4-bit layers: each row is what its adapter alone gives."""
    import quantised_models as qm

    ours, _ = _quantised_pair(llama_folder, 4)
    torch.manual_seed(5)
    ours.add_adapter("other", _quant_config(fastpeft, r=2))
    ours.eval()
    batch = qm.inputs()
    names = ["other", "default"]
    mixed = qm.logits(ours, {**batch, "adapter_names": names})
    for i, name in enumerate(names):
        ours.set_adapter(name)
        close(mixed[i:i + 1], qm.logits(ours, {k: v[i:i + 1] for k, v in batch.items()}), f"row {i}")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_merge_of_two_adapters_starts_from_w0(llama_folder, bits):
    """Two active adapters merged into the quantised weights: each update is W0 * B A with W0 the weight
    from before the merge (so the merged logits are the unmerged ones up to requantisation; HF PEFT 0.21
    multiplies the merged weight by 1 + B A again), and unmerging restores the quantised weights exactly."""
    import quantised_models as qm

    ours, _ = _quantised_pair(llama_folder, bits)
    torch.manual_seed(5)
    ours.add_adapter("other", _quant_config(fastpeft, r=2))
    models.perturb(ours, 6, 0.1, wanted=lambda n: n.endswith(".other"))
    ours.base_model.set_adapter(["default", "other"])
    ours.eval()
    expected = qm.logits(ours)
    with ours.disable_adapter():
        plain = qm.logits(ours)
    before = {id(m): m.get_base_layer().weight.data.clone() for m in ours.base_model.adapter_layers()}
    ours.base_model.merge_adapter(allow_lossy_merge=True)
    merged = qm.logits(ours)
    assert (merged - expected).norm() < (0.5 if bits == 4 else 0.05) * (expected - plain).norm()
    ours.base_model.unmerge_adapter()
    assert all(torch.equal(m.get_base_layer().weight.data, before[id(m)])
               for m in ours.base_model.adapter_layers())
    close(qm.logits(ours), expected, "unmerged")
