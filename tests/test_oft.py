"""OFT against HF PEFT 0.21.2: files both ways, outputs, gradients, merging, several adapters, orthogonality."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods import orthogonal as orth  # noqa: E402
from fastpeft.methods.oft import OFTConfig  # noqa: E402

ATOL = 1e-5

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=5)),
    "mlp_exact_r": ("mlp", dict(target_modules=["lin0", "lin1"], r=2, oft_block_size=0, use_cayley_neumann=False)),
    "mlp_coft_share": ("mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=5, coft=True, eps=0.05,
                                   block_share=True, bias="oft_only")),
    "conv2d": ("conv2d", dict(target_modules=["conv0"], oft_block_size=6)),
    "embedding": ("emb", dict(target_modules=["emb", "lin"], oft_block_size=3, num_cayley_neumann_terms=3)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"],
                            oft_block_size=8)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", oft_block_size=8, use_cayley_neumann=False)),
    "llama_layer1": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"], oft_block_size=8,
                                   layers_to_transform=[1], layers_pattern="layers")),
}
# HF PEFT's unmerged OFT Conv2d (kernel > 1) is not its merged convolution: merging there is compared by weights only
MERGE_KEEPS_OUTPUTS = ["mlp", "mlp_exact_r", "mlp_coft_share", "embedding", "llama"]


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    return (OFTConfig if lib is fastpeft else lib.OFTConfig)(**kw)


def build(lib, case, seed=0, **extra):
    factory = models.MODELS[CASES[case][0]][0]
    model = lib.get_peft_model(factory(), config(lib, case, **extra))
    return models.perturb(model, seed, 0.1).eval()


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def base_out(case):
    return models.forward(models.MODELS[CASES[case][0]][0](), inputs(case))


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def differs(a, b):
    assert (a - b).abs().max().item() > 1e-3, "the adapter does not change the outputs"


def copy_hf_into_fastpeft(build_fn, factory, fp_config):
    """An HF model (perturbed) and a fastpeft model with the same adapter tensors (through the state-dict API)."""
    hf = build_fn()
    fp = fastpeft.get_peft_model(factory(), fp_config)
    fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf))
    return hf, fp.eval()


def grads(model, lib):
    return lib.get_peft_model_state_dict(
        model, state_dict={n: p.grad for n, p in model.named_parameters() if p.requires_grad})


def training_grads(models_and_libs, x, seed=1):
    """One backward pass of each model (same seed before each): {lib: gradient file state}."""
    out = {}
    for model, lib in models_and_libs:
        model.train()
        torch.manual_seed(seed)
        result = model(**x) if isinstance(x, dict) else model(x)
        result = result.logits if hasattr(result, "logits") else result
        (result.float() ** 2).mean().backward()
        out[lib] = grads(model, lib)
    return out


def compare_saved_configs(tmp_path):
    fp_cfg, hf_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fp", "hf"))
    for cfg in (fp_cfg, hf_cfg):
        cfg.pop("peft_version")
        for k, v in cfg.items():
            cfg[k] = sorted(map(str, v)) if isinstance(v, list) else v
    assert fp_cfg == hf_cfg


def compare_saved_files(tmp_path, values: bool):
    fp_sd = load_file(str(tmp_path / "fp" / "adapter_model.safetensors"))
    hf_sd = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    assert set(fp_sd) == set(hf_sd) and fp_sd
    for k in hf_sd:
        assert fp_sd[k].shape == hf_sd[k].shape, k
        if values:
            close(fp_sd[k], hf_sd[k], k)


# ---------------------------------------------------------------------------------------------- files, both ways
@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    hf = build(peft, case)
    hf_out = models.forward(hf, inputs(case))
    differs(hf_out, base_out(case))
    hf.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(models.MODELS[CASES[case][0]][0](), str(tmp_path)).eval()
    close(models.forward(fp, inputs(case)), hf_out, "fastpeft(HF adapter) vs HF PEFT")


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    fp = build(fastpeft, case)
    fp_out = models.forward(fp, inputs(case))
    differs(fp_out, base_out(case))
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(models.MODELS[CASES[case][0]][0](), str(tmp_path)).eval()
    close(models.forward(hf, inputs(case)), fp_out, "HF PEFT(fastpeft adapter) vs fastpeft")


@pytest.mark.parametrize("case", ["mlp", "mlp_coft_share", "conv2d", "embedding", "bert"])
def test_saved_files_config_and_init_match_hf(case, tmp_path):
    factory = models.MODELS[CASES[case][0]][0]
    fp_model = fastpeft.get_peft_model(factory(), config(fastpeft, case)).eval()
    hf_model = peft.get_peft_model(factory(), config(peft, case)).eval()
    close(models.forward(fp_model, inputs(case)), models.forward(hf_model, inputs(case)), "at init")
    fp_model.save_pretrained(str(tmp_path / "fp"))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    compare_saved_files(tmp_path, values=True)
    compare_saved_configs(tmp_path)


@pytest.mark.parametrize("case", ["mlp", "embedding"])
def test_random_init_has_hf_shapes_and_scale(case, tmp_path):
    """init_weights=False: normal(0, 0.1) blocks in both libraries (same keys and shapes, similar spread)."""
    for lib, sub in ((fastpeft, "fp"), (peft, "hf")):
        model = lib.get_peft_model(models.MODELS[CASES[case][0]][0](), config(lib, case, init_weights=False))
        model.save_pretrained(str(tmp_path / sub))
    compare_saved_files(tmp_path, values=False)
    for t in load_file(str(tmp_path / "fp" / "adapter_model.safetensors")).values():
        assert 0.03 < t.std().item() < 0.3


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["mlp", "mlp_exact_r", "mlp_coft_share", "conv2d", "embedding", "llama"])
def test_training_step_gradients_match_hf(case):
    hf, fp = copy_hf_into_fastpeft(lambda: build(peft, case), models.MODELS[CASES[case][0]][0],
                                   config(fastpeft, case))
    got = training_grads([(hf, peft), (fp, fastpeft)], inputs(case))
    assert set(got[fastpeft]) == set(got[peft])
    for k in got[peft]:
        close(got[fastpeft][k], got[peft][k], f"grad {k}")
    assert max(g.abs().max().item() for g in got[fastpeft].values()) > 1e-5
    # COFT projects the parameters in place during forward: the projected values agree too
    close_states(fp, hf)


def close_states(fp, hf):
    fp_sd, hf_sd = fastpeft.get_peft_model_state_dict(fp), peft.get_peft_model_state_dict(hf)
    assert set(fp_sd) == set(hf_sd)
    for k in hf_sd:
        close(fp_sd[k], hf_sd[k], k)


def test_bias_oft_only_trains_adapted_biases():
    for lib in (fastpeft, peft):
        model = build(lib, "mlp_coft_share")
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
        assert trainable == ["base_model.model.lin0.base_layer.bias", "base_model.model.lin1.base_layer.bias"], lib


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", MERGE_KEEPS_OUTPUTS + ["conv2d"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = copy_hf_into_fastpeft(lambda: build(peft, case), models.MODELS[CASES[case][0]][0],
                                   config(fastpeft, case))
    x = inputs(case)
    expected = models.forward(fp, x)
    weights = {n: p.detach().clone() for n, p in fp.named_parameters() if "base_layer" in n}
    fp.base_model.merge_adapter(safe_merge=safe)
    if case in MERGE_KEEPS_OUTPUTS:
        close(models.forward(fp, x), expected, "merged")
    assert any((weights[n] - p).abs().max() > 1e-4 for n, p in fp.named_parameters() if n in weights)
    fp.base_model.unmerge_adapter()
    close(models.forward(fp, x), expected, "unmerged")
    for n, p in fp.named_parameters():
        if n in weights:
            close(p, weights[n], f"restored {n}")
    with fp.disable_adapter(), hf.disable_adapter():  # (trained biases stay, as in HF)
        close(models.forward(fp, x), models.forward(hf, x), "disabled")
    merged = fp.merge_and_unload(safe_merge=safe)
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in merged.named_parameters():
        close(p, hf_w[n], f"merged weight {n}")


def test_hf_unmerge_equals_ours_with_neumann_rotation():
    """Neumann rotations are not exactly orthogonal: unmerge must invert (solve), not transpose, as HF's inverse."""
    hf, fp = copy_hf_into_fastpeft(lambda: build(peft, "mlp", seed=3), models.make_mlp, config(fastpeft, "mlp"))
    with torch.no_grad():
        for model in (hf, fp):
            for n, p in model.named_parameters():
                if "oft_R" in n:
                    p.mul_(6.0)
    blocks = fp.base_model.model.lin0.oft_R["default"].blocks()
    assert orth.orthogonality_error(blocks) > 1e-4
    for model in (hf, fp):
        model.merge_adapter()
        model.unmerge_adapter()
    hf_w = dict(hf.named_parameters())
    for n, p in fp.named_parameters():
        close(p, hf_w[n], n, atol=1e-4)
    close(fp.base_model.model.lin0.base_layer.weight, models.make_mlp().lin0.weight, "restored", atol=1e-4)


# ---------------------------------------------------------------------------------------------- several adapters
def two_adapters(lib):
    model = build(lib, "mlp")
    model.add_adapter("other", config(lib, "mlp", target_modules=["lin1", "head"], oft_block_size=4))
    models.perturb(model, 5, 0.1, wanted=lambda n: ".other." in n)
    return model


def test_two_adapters_active_and_switching_match_hf():
    hf, fp = two_adapters(peft), two_adapters(fastpeft)
    fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf, adapter_name="other"), "other")
    fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf))
    x = models.mlp_inputs()
    for active in (["default", "other"], "other", "default"):
        hf.base_model.set_adapter(active)
        fp.base_model.set_adapter(active)
        close(models.forward(fp, x), models.forward(hf, x), f"active={active}")
    hf.base_model.set_adapter(["default", "other"])
    fp.base_model.set_adapter(["default", "other"])
    expected = models.forward(fp, x)
    for model in (hf, fp):
        model.merge_adapter(["default", "other"])
    # (two rotations of one layer do not commute: as in HF, merging both is not the unmerged forward)
    close(models.forward(fp, x), models.forward(hf, x), "both merged vs HF")
    fp.unmerge_adapter()
    close(models.forward(fp, x), expected, "both unmerged")


def test_mixed_batch_rows_equal_single_adapter_runs():
    fp = two_adapters(fastpeft)
    x = models.mlp_inputs()[:3]
    names = ["default", "other", "__base__"]
    mixed = fp(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with fp.disable_adapter():
                want = fp(x[i:i + 1])
        else:
            fp.base_model.set_adapter(name)
            want = fp(x[i:i + 1])
        close(mixed[i:i + 1], want, f"row {i} ({name})")


def test_delete_adapter_and_reload(tmp_path):
    fp = two_adapters(fastpeft)
    x = models.mlp_inputs()
    fp.base_model.set_adapter("other")
    other_out = models.forward(fp, x)
    fp.save_pretrained(str(tmp_path))
    fp.delete_adapter("other")
    assert "other" not in fp.base_model.model.lin1.oft_R
    assert not hasattr(fp.base_model.model.head, "oft_R")
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path / "other"), adapter_name="other")
    close(models.forward(loaded.eval(), x), other_out, "reloaded 'other'")


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_rotation_blocks_equal_hf_and_orthogonality(terms):
    """Blocks from our Cayley / Neumann code equal HF's dense block-diagonal get_weight(); exact ones are orthogonal."""
    for neumann in (True, False):
        kw = dict(oft_block_size=5, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
        hf, fp = copy_hf_into_fastpeft(lambda kw=kw: build(peft, "mlp", **kw), models.make_mlp,
                                       config(fastpeft, "mlp", **kw))
        ours = fp.base_model.model.lin1.oft_R["default"].blocks()
        theirs = hf.base_model.model.lin1.oft_R["default"].get_weight()
        close(orth.block_diagonal(ours), theirs, f"terms={terms} neumann={neumann}")
        if not neumann:
            assert orth.orthogonality_error(ours) < 1e-5
    small = torch.randn(3, 10) * 0.01
    skew = orth.skew_from_vector(small, 5)
    errors = [orth.orthogonality_error(orth.cayley(skew, n)).item() for n in (2, 5, 9)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_coft_keeps_blocks_inside_the_ball():
    vec = torch.randn(4, 10)
    projected = orth.project_coft(vec, 5, eps=0.1)
    norms = torch.linalg.matrix_norm(orth.skew_from_vector(projected, 5))
    assert (norms <= 0.1 / 2 + 1e-6).all()
    inside = vec * 1e-4
    close(orth.project_coft(inside, 5, eps=0.1), inside, "inside kept")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="exactly one of r"):
        OFTConfig(r=4, oft_block_size=4)
    with pytest.raises(ValueError, match="exactly one of r"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="bias"):
        OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="layers_to_transform"):
        OFTConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="oft_block_size"):
        OFTConfig.from_dict({"peft_type": "OFT", "r": 8})


def test_unsupported_convolutions_are_refused():
    with pytest.raises(ValueError, match="groups > 1"):
        fastpeft.get_peft_model(models.make_conv2d(), OFTConfig(target_modules=["gconv"], oft_block_size=4))
    with pytest.raises(ValueError, match="non-square kernel"):
        fastpeft.get_peft_model(models.make_conv2d(), OFTConfig(target_modules=["conv1"], oft_block_size=4))
    with pytest.raises(ValueError, match="OFT cannot wrap"):
        fastpeft.get_peft_model(models.make_conv1d(), OFTConfig(target_modules=["conv0"], oft_block_size=4))


def test_eval_rotation_is_cached_until_the_parameters_change():
    fp = build(fastpeft, "mlp_exact_r")
    module = fp.base_model.model.lin0.oft_R["default"]
    x = models.mlp_inputs()
    with torch.no_grad():
        first = module.blocks()
        assert module.blocks() is first
        module.weight.add_(0.05)
        changed = module.blocks()
    assert changed is not first and (changed - first).abs().max() > 1e-3
    assert module.blocks().requires_grad  # with gradients wanted: recomputed, part of the graph
    hf = peft.get_peft_model(models.make_mlp(), config(peft, "mlp_exact_r"))
    peft.set_peft_model_state_dict(hf, fastpeft.get_peft_model_state_dict(fp))
    close(models.forward(fp, x), models.forward(hf.eval(), x), "after the in-place change")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_matches_hf(dtype):
    """fp32 adapters on a half-precision base (autocast): same outputs and merged weights as HF PEFT."""
    def make():
        return models.make_mlp().to(dtype)

    hf, fp = copy_hf_into_fastpeft(lambda: build_on(peft, make), make, config(fastpeft, "mlp"))
    x = models.mlp_inputs().to(dtype)
    close(models.forward(fp, x).float(), models.forward(hf, x).float(), "half outputs", atol=1e-2)
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in fp.merge_and_unload().named_parameters():
        close(p.float(), hf_w[n].float(), n, atol=1e-2)


def build_on(lib, make):
    return models.perturb(lib.get_peft_model(make(), config(lib, "mlp")), 0, 0.1).eval()


def test_old_neumann_adapter_config_is_flagged(caplog):
    data = OFTConfig(target_modules=["lin0"]).to_json_dict()
    with caplog.at_level("WARNING"):
        OFTConfig.from_dict({**data, "peft_version": "0.17.1"})
    assert "PEFT < 0.18" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        OFTConfig.from_dict(data)
    assert "PEFT < 0.18" not in caplog.text
