"""BD-LoRA (`use_bdlora`) against HF PEFT: init and files, outputs and files both ways, gradients, merging,
errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.config import BdLoraConfig as HFBdLoraConfig
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.variants.bdlora import BdLoraConfig, BlockDiagonalLinear

import models

ATOL = 1e-5

# model, LoraConfig kwargs, BdLoraConfig kwargs
CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8),
            dict(target_modules_bd_a=["lin1"], target_modules_bd_b=["lin0"], nblocks=2)),
    "mlp_loose": ("mlp", dict(target_modules=["lin0", "lin1", "head"], r=4, lora_alpha=8, lora_dropout=0.2),
                  dict(target_modules_bd_a=["lin1"], nblocks=4, match_strict=False)),
    # Conv1D: plain
    "gpt2_conv1d_loose": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj", "head"], r=4),
                          dict(target_modules_bd_a=["head"], nblocks=2, match_strict=False)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]),
              dict(target_modules_bd_a=["o_proj", "down_proj"],
                   target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], nblocks=2)),
}


def config(lib, case, bd=None, **extra):
    _, kw, bd_kw = CASES[case]
    kw = {**kw, **extra}
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    bd_cls = BdLoraConfig if lib is fastpeft else HFBdLoraConfig
    return lib.LoraConfig(**kw, use_bdlora=bd_cls(**(bd or bd_kw)))


def factory(case):
    return models.MODELS[CASES[case][0]][0]


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, perturb=True, **extra):
    """A BD-LoRA model of `lib`; factories seed torch, so both libraries draw the same init. Then every
    trainable tensor is perturbed by the same generator (B starts at zero)."""
    model = lib.get_peft_model(factory(case)(), config(lib, case, **extra))
    if perturb:
        models.perturb(model, 0, 0.3)
    return model.eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def base_out(case):
    return models.forward(factory(case)(), inputs(case))


@pytest.mark.parametrize("case", list(CASES))
def test_init_and_files_match_hf(case, tmp_path):
    """Same seed: the same tensors (block factors kaiming-drawn / zero), keys, shapes and
    adapter_config.json."""
    fp, hf = build(fastpeft, case, perturb=False), build(peft, case, perturb=False)
    close(models.forward(fp, inputs(case)), base_out(case), "identity at init")
    fp.save_pretrained(str(tmp_path / "fp"))
    hf.save_pretrained(str(tmp_path / "hf"))
    fp_sd, hf_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("fp", "hf"))
    assert set(fp_sd) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k
    fp_cfg, hf_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fp", "hf"))
    assert fp_cfg["use_bdlora"] == hf_cfg["use_bdlora"]
    assert fp_cfg["use_bdlora"]["nblocks"] == CASES[case][2]["nblocks"]


def test_block_factor_shapes_in_files(tmp_path):
    build(fastpeft, "mlp").save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sd["base_model.model.lin1.lora_A.weight"].shape == (4, 10)  # (r, in / nblocks), in = 20
    assert sd["base_model.model.lin0.lora_B.weight"].shape == (20, 2)  # (out, r / nblocks)
    assert sd["base_model.model.lin0.lora_A.weight"].shape == (4, 10)  # plain


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    hf = build(peft, case)
    expected = models.forward(hf, inputs(case))
    assert (expected - base_out(case)).abs().max() > 1e-3
    hf.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    assert isinstance(fp.peft_config["default"].use_bdlora, BdLoraConfig)
    close(models.forward(fp, inputs(case)), expected, "fastpeft(HF adapter) vs HF")


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    fp = build(fastpeft, case)
    expected = models.forward(fp, inputs(case))
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    close(models.forward(hf, inputs(case)), expected, "HF(fastpeft adapter) vs fastpeft")
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf), fastpeft.get_peft_model_state_dict(fp)
    assert set(hf_sd) == set(fp_sd)
    for k in fp_sd:
        assert torch.equal(hf_sd[k], fp_sd[k]), k


def _grads(model, lib):
    return lib.get_peft_model_state_dict(model, state_dict={n: p.grad for n, p in model.named_parameters()
                                                            if p.requires_grad})


@pytest.mark.parametrize("case", list(CASES))
def test_training_gradients_match_hf(case):
    hf, fp = build(peft, case), build(fastpeft, case)
    x = inputs(case)
    for model in (hf, fp):
        model.train()
        torch.manual_seed(1)  # same dropout masks
        out = model(**x) if isinstance(x, dict) else model(x)
        out = out.logits if hasattr(out, "logits") else out
        (out.float() ** 2).mean().backward()
    hf_g, fp_g = _grads(hf, peft), _grads(fp, fastpeft)
    assert set(fp_g) == set(hf_g)
    for k in hf_g:
        close(fp_g[k], hf_g[k], f"grad {k}")
    assert max(g.abs().max().item() for g in fp_g.values()) > 1e-4


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_and_unload_match_hf(case, safe):
    hf, fp = build(peft, case), build(fastpeft, case)
    x = inputs(case)
    expected = models.forward(fp, x)
    weights = {n: p.detach().clone() for n, p in fp.named_parameters() if "base_layer" in n}
    fp.base_model.merge_adapter(safe_merge=safe)
    close(models.forward(fp, x), expected, "merged")
    fp.base_model.unmerge_adapter()
    for n, p in fp.named_parameters():
        if n in weights:
            close(p, weights[n], f"restored {n}")
    hf_w = dict(hf.merge_and_unload(safe_merge=safe).named_parameters())
    merged = fp.merge_and_unload(safe_merge=safe)
    close(models.forward(merged, x), expected, "merge_and_unload")
    for n, p in merged.named_parameters():
        close(p, hf_w[n], f"merged weight {n}")


def test_lora_bias_with_block_diagonal_a_merges_like_hf():
    extra = dict(lora_bias=True)
    bd = dict(target_modules_bd_a=["lin0", "lin1"], nblocks=2)
    hf = build(peft, "mlp", bd=bd, **extra)
    fp = build(fastpeft, "mlp", bd=bd, **extra)
    x = inputs("mlp")
    expected = models.forward(hf, x)
    close(models.forward(fp, x), expected, "lora_bias outputs")
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in fp.merge_and_unload().named_parameters():
        close(p, hf_w[n], f"merged {n}")


def test_block_diagonal_linear_is_the_dense_block_matrix():
    layer = BlockDiagonalLinear(12, 6, nblocks=3, zero=False)
    x = torch.randn(2, 5, 12)
    dense = layer.dense()
    assert dense.shape == (6, 12)
    assert torch.count_nonzero(dense[:2, 4:]) == 0 and torch.count_nonzero(dense[2:4, :4]) == 0
    close(layer(x), x @ dense.T, "block forward")


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bd,extra,match", [
    (dict(target_modules_bd_a=["lin0"], nblocks=3), {}, "nblocks=3 does not divide"),  # r=4
    (dict(target_modules_bd_a=["lin0"], nblocks=2), {}, "matches neither"),  # lin1, match_strict
    (dict(target_modules_bd_a=["lin"], target_modules_bd_b=["lin1"], nblocks=2), {}, "matches both"),
    (dict(target_modules_bd_b=["lin0", "lin1"], nblocks=2), {"use_dora": True}, "cannot be combined"),
])
def test_bad_configs_refused_like_hf(bd, extra, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(models.make_mlp(), config(fastpeft, "mlp", bd=bd, **extra))
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(models.make_mlp(), config(peft, "mlp", bd=bd, **extra))


def test_unsupported_layer_kinds_refused():
    emb = fastpeft.LoraConfig(target_modules=["emb"], use_bdlora=BdLoraConfig(target_modules_bd_a=["emb"]))
    with pytest.raises(ValueError, match="use_bdlora is not supported on embedding"):
        fastpeft.get_peft_model(models.make_emb(), emb)
    conv1d = fastpeft.LoraConfig(target_modules=["c_fc"], use_bdlora=BdLoraConfig(
        target_modules_bd_b=["c_fc"], nblocks=2))
    with pytest.raises(ValueError, match="Conv1D"):
        fastpeft.get_peft_model(models.make_conv1d_gpt2(), conv1d)
    params = fastpeft.LoraConfig(target_parameters=["lin0.weight"], target_modules=[],
                                 use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"], nblocks=2))
    with pytest.raises(ValueError, match="target_parameters"):
        fastpeft.get_peft_model(models.make_mlp(), params)


def test_bad_subconfigs_refused():
    with pytest.raises(ValueError, match="both target_modules_bd_a and target_modules_bd_b"):
        BdLoraConfig(target_modules_bd_a=["x"], target_modules_bd_b=["x"])
    with pytest.raises(ValueError, match="nblocks must be a positive integer"):
        BdLoraConfig(nblocks=0)
    with pytest.raises(TypeError, match="use_bdlora must be a BdLoraConfig"):
        fastpeft.LoraConfig(use_bdlora=True)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        fastpeft.LoraConfig(use_bdlora={"target_modules_bd_a": ["lin0"]}, init_lora_weights="pissa")
    bias_b = dict(target_modules_bd_b=["lin0", "lin1"], nblocks=2)
    with pytest.raises(ValueError, match="lora_bias=True with a block-diagonal LoRA B"):
        fastpeft.get_peft_model(models.make_mlp(), config(fastpeft, "mlp", bd=bias_b, lora_bias=True))
    cfg = fastpeft.LoraConfig(target_modules=["lin0"],
                              use_bdlora={"target_modules_bd_a": ["lin0"], "nblocks": 2})
    assert isinstance(cfg.use_bdlora, BdLoraConfig) and cfg.use_bdlora.match_strict is True


def test_refused_injection_leaves_model_unchanged():
    model = models.make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        fastpeft.get_peft_model(model,
                                config(fastpeft, "mlp", bd=dict(target_modules_bd_a=["lin1"], nblocks=2)))
    assert not any(isinstance(m, BlockDiagonalLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_subconfig_fields_and_defaults_match_hf():
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(BdLoraConfig)}
    assert ours == {f.name: f.default for f in dataclasses.fields(HFBdLoraConfig)}
