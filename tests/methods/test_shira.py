"""SHiRA against HF PEFT 0.21.2: seeded masks and init, files both ways (positions saved), outputs,
gradients, merging, several adapters, mixed batches, custom mask functions, refusals."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.methods.shira import ShiraConfig, ShiraModel

import models
import oracle_helpers

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    # HF PEFT's own SHiRA rows use the MLP with r = 1 / 2 on lin0 / lin1
    "mlp": ("mlp", dict(r=1, target_modules=["lin0"])),
    "mlp_two": ("mlp", dict(r=2, target_modules=["lin0", "lin1"], random_seed=11)),
    "mlp_randn": ("mlp", dict(r=1, target_modules=["lin0", "lin1"], init_weights=False, random_seed=3)),
    "mlp_save_head": ("mlp", dict(r=1, target_modules=["lin1"], modules_to_save=["head"])),
    "llama": ("llama", dict(r=2, task_type="CAUSAL_LM", random_seed=42)),
    "llama_all_linear": ("llama", dict(r=1, task_type="CAUSAL_LM", target_modules="all-linear")),
    "bert": ("bert_cls", dict(r=2, task_type="SEQ_CLS", random_seed=1)),
}
TABLE = oracle_helpers.CaseTable(CASES, ShiraConfig, peft.ShiraConfig, scale=0.3, init_seed=7)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("case", ["mlp", "mlp_two", "mlp_randn", "llama"])
def test_seeded_init_and_positions_match_hf(case):
    """Same seeds: the same trained values and the same positions (int32, row-major) in every layer."""
    hf, fp = TABLE.fresh(peft, case), TABLE.fresh(fastpeft, case)
    oracle_helpers.assert_same_state_dict(fp.state_dict(), hf.state_dict())
    hf_layers = _layers(hf, peft.tuners.shira.ShiraLayer)
    fp_layers = _layers(fp, fastpeft.core.layer.AdapterLayer)
    assert set(hf_layers) == set(fp_layers) and hf_layers
    for name, layer in hf_layers.items():
        ours = fp_layers[name].shira_indices["default"]
        assert ours.dtype == layer.shira_indices["default"].dtype == torch.int32, name
        assert torch.equal(ours, layer.shira_indices["default"]), name
    if CASES[case][1].get("init_weights", True):
        close(models.forward(fp, inputs(case)), models.forward(base(case), inputs(case)), "identity at init")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF save -> fastpeft load -> save gives HF's keys, tensors and config; each library loads the other's
    files with the same outputs (perturbed, non-identity adapters)."""
    oracle_helpers.assert_loads_both_ways(TABLE, case, tmp_path, close)
    keys = load_file(str(tmp_path / "hf_made" / "hf" / "adapter_model.safetensors"))
    assert any(k.endswith(".shira_indices") for k in keys) and any(k.endswith(".shira_weight") for k in keys)


@pytest.mark.parametrize("case", ["mlp_two", "llama", "bert"])
def test_training_step_gradients_match_hf(case):
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case),
                                            lambda a, b, w: close(a, b, w, atol=1e-4), "shira_weight")


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case, random_seed=99))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp_two", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    oracle_helpers.assert_adapters_merge_like_hf(_two_adapters(fastpeft, case), _two_adapters(peft, case),
                                                 inputs(case), close)


def test_disable_set_delete_and_mixed_batch_match_hf():
    oracle_helpers.assert_adapter_switching_like_hf(_two_adapters(fastpeft, "llama"),
                                                    _two_adapters(peft, "llama"), inputs("llama"),
                                                    models.forward(base("llama"), inputs("llama")), close)


def test_mixed_batch_rows_use_their_own_adapter():
    model = _two_adapters(fastpeft, "mlp_two").eval()
    oracle_helpers.assert_mixed_batch_rows(model, inputs("mlp_two"), ["other", "__base__", "default"], close)


def test_second_adapter_files_like_hf(tmp_path):
    oracle_helpers.assert_second_adapter_like_hf(lambda lib: _two_adapters(lib, "mlp_two"),
                                                 lambda: base("mlp_two"), inputs("mlp_two"), tmp_path, close)


def _diagonal_mask(base_layer, r, **kwargs):
    """A custom mask: the first r * (in + out) entries of the flattened weight, row-major."""
    out_f, in_f = base_layer.weight.shape
    mask = torch.zeros(out_f * in_f, dtype=base_layer.weight.dtype)
    mask[: r * (in_f + out_f)] = 1
    return mask.view(out_f, in_f)


def test_custom_mask_fn_like_hf_and_files_load_without_it(tmp_path):
    """A user mask_fn gives HF's positions; a file of a custom mask_type loads in both libraries (positions
    from the file, no mask_fn needed)."""
    built = {}
    for lib in (fastpeft, peft):
        cfg = TABLE.classes[lib](r=2, target_modules=["lin0", "lin1"], mask_type="first_rows")
        cfg.mask_fn = _diagonal_mask
        built[lib] = models.perturb(lib.get_peft_model(models.make_mlp(), cfg), 0, 0.3).eval()
        built[lib].save_pretrained(str(tmp_path / lib.__name__))
    x = models.mlp_inputs()
    expected = models.forward(built[peft], x)
    close(models.forward(built[fastpeft], x), expected, "custom mask")
    oracle_helpers.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")
    ours = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "peft")).eval()
    close(models.forward(ours, x), expected, "HF custom-mask file -> fastpeft")
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "fastpeft")).eval()
    close(models.forward(theirs, x), expected, "fastpeft custom-mask file -> HF")


def test_custom_mask_type_without_mask_fn_refuses_forward():
    model = fastpeft.get_peft_model(models.make_mlp(), ShiraConfig(r=1, target_modules=["lin0"],
                                                                   mask_type="mine"))
    with pytest.raises(ValueError, match="no mask positions.*config.mask_fn"):
        model(models.mlp_inputs())


def test_bad_sizes_and_layers_are_refused_before_building():
    mlp = models.make_mlp()
    with pytest.raises(ValueError, match=r"r=7 .*'lin0'.*at most 6"):
        fastpeft.get_peft_model(mlp, ShiraConfig(r=7, target_modules=["lin0"]))
    assert not any("shira" in n for n, _ in mlp.named_modules())
    with pytest.raises(ValueError, match="r must be a positive integer"):
        ShiraConfig(r=0)
    with pytest.raises(ValueError, match="cannot wrap module 'c_fc'"):
        fastpeft.get_peft_model(models.make_conv1d_gpt2(), ShiraConfig(r=1, target_modules=["c_fc"]))
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), ShiraConfig(r=1, target_modules=["emb"]))
    cfg = ShiraConfig(r=1, target_modules=["lin0"], mask_type="mine")
    cfg.mask_fn = lambda base_layer, r, **kw: torch.ones_like(base_layer.weight)
    with pytest.raises(ValueError, match=r"200 ones for layer 'lin0'.*30 entries"):
        fastpeft.get_peft_model(models.make_mlp(), cfg)
    cfg = ShiraConfig(r=1, target_modules=["lin0"], fan_in_fan_out=True)
    model = fastpeft.get_peft_model(models.make_mlp(), cfg)
    assert isinstance(model.base_model, ShiraModel) and cfg.fan_in_fan_out is False


def test_file_positions_outside_the_layer_are_refused(tmp_path):
    model = build(fastpeft, "mlp")
    model.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.lin0.shira_indices"][1, 0] = 10  # lin0 has 10 input columns: 0..9
    save_file(tensors, path)
    with pytest.raises(ValueError, match="shira_indices holds positions outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


def test_set_scale_scales_the_update_like_hf():
    hf, fp = build(peft, "mlp_two"), build(fastpeft, "mlp_two")
    for model in (hf, fp):
        for module in model.modules():
            if hasattr(module, "shira_weight"):
                module.set_scale("default", 0.5)
    close(models.forward(fp, inputs("mlp_two")), models.forward(hf, inputs("mlp_two")), "scale 0.5")


def test_low_cpu_mem_usage_load_and_oversize_r_in_file(tmp_path):
    """Weights built on the meta device get the file's values and positions; an r no model could hold is
    refused from the config file before anything is allocated."""
    model = build(fastpeft, "mlp_two")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), inputs("mlp_two")), models.forward(model, inputs("mlp_two")), "meta")
    oracle_helpers.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"ShiraConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))
