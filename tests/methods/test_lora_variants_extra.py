"""MiCA (init_lora_weights='mica'), KaSA (kasa_config) and VeLoRA (velora_config) against HF PEFT.

Same base model and seed on both sides: same initial adapter (and truncated base for KaSA), same trainable
set, same outputs and gradients of every trainable tensor, same merges, same files (keys and values), both
directions.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.variants.kasa import KasaConfig, kasa_loss
from fastpeft.methods.lora.variants.velora import VeloraConfig

import models

ATOL = 1e-5

# variant -> (fastpeft kwargs, HF kwargs); sub-configs are built per library
VARIANTS = {
    "mica": lambda lib: {"init_lora_weights": "mica"},
    "kasa": lambda lib: {"kasa_config": _sub(lib, "KasaConfig", beta=1e-3, gamma=1e-2)},
    "velora": lambda lib: {"velora_config": _sub(lib, "VeloraConfig", num_groups=4)},
    "velora_once": lambda lib: {"velora_config": _sub(lib, "VeloraConfig", num_groups=3,
                                                      init_type="batch_average_once", scale=0.5)},
    "velora_random": lambda lib: {
        "velora_config": _sub(lib, "VeloraConfig", num_groups=8, init_type="random")},
}
MODELS = {
    "mlp": ("mlp", {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8}),
    "llama": ("llama", {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4,
                        "lora_alpha": 8}),
    "mica_emb": ("emb", {"target_modules": ["emb", "lin"], "r": 4, "lora_alpha": 4}),
    "velora_gpt2": ("conv1d_gpt2", {"target_modules": ["c_fc", "c_proj"], "r": 4, "fan_in_fan_out": True}),
    "bias": ("mlp", {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "lora_bias": True}),
}
PAIRS = [(v, "mlp") for v in VARIANTS] + [(v, "llama") for v in ("mica", "kasa", "velora")] + [
    ("mica", "mica_emb"), ("velora", "velora_gpt2"), ("kasa", "bias"), ("velora", "bias")]


def _sub(lib, name, **kw):
    cls = getattr(lib, name) if lib is peft else {"KasaConfig": KasaConfig,
                                                  "VeloraConfig": VeloraConfig}[name]
    return cls(**kw)


def config(lib, variant, case, **extra):
    kw = {**copy.deepcopy(MODELS[case][1]), **VARIANTS[variant](lib), **extra}
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    return lib.LoraConfig(**kw)


def base(case):
    return models.MODELS[MODELS[case][0]][0]()


def inputs(case):
    return models.MODELS[MODELS[case][0]][1]()


def build(lib, variant, case, perturb=True):
    torch.manual_seed(7)  # same RNG stream for the adapter's random parts on both sides
    model = lib.get_peft_model(base(case), config(lib, variant, case))
    if perturb:  # move every trainable tensor off its init (same noise on both sides: sorted names)
        models.perturb(model, 3, 0.2)
    return model.eval()


def pair(variant, case, perturb=True):
    return build(peft, variant, case, perturb), build(fastpeft, variant, case, perturb)


def run(model, case):
    x = inputs(case)
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("variant,case", PAIRS)
def test_same_init_and_trainable_set(variant, case):
    hf, fp = pair(variant, case, perturb=False)
    hs, fs = hf.state_dict(), fp.state_dict()
    assert hs.keys() == fs.keys()
    for key in hs:  # adapter tensors, buffers and (KaSA) the truncated base weights
        close(fs[key], hs[key], key)
    grads = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert grads == {n for n, p in fp.named_parameters() if p.requires_grad}
    if variant == "mica":  # only A trains; B holds orthonormal minor directions
        assert grads and all("_A" in n for n in grads)
    close(run(fp, case), run(hf, case), "outputs at init")


def test_mica_b_is_the_minor_subspace():
    """Independent check of the MiCA init: B spans the left singular vectors of W with the r smallest
    values."""
    fp = build(fastpeft, "mica", "mlp", perturb=False)
    layer = fp.base_model.model.lin1
    w = layer.get_base_layer().weight.detach()
    b = layer.lora_B["default"].weight.detach()
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    sv = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.norm(w.T @ b, dim=0).sort().values, sv[-4:].sort().values,
                               atol=1e-5, rtol=0)
    assert torch.count_nonzero(layer.lora_A["default"].weight) == 0


def test_kasa_truncates_the_r_smallest_components():
    fp = build(fastpeft, "kasa", "mlp", perturb=False)
    w = fp.base_model.model.lin1.get_base_layer().weight.detach()
    original = models.make_mlp().lin1.weight.detach()
    sv, sv0 = torch.linalg.svdvals(w), torch.linalg.svdvals(original)
    torch.testing.assert_close(sv[:-4], sv0[:-4], atol=1e-5, rtol=0)
    assert sv[-4:].abs().max() < 1e-5


# --------------------------------------------------------------------------------------------- outputs, grads
def _grads(model, case):
    model.train()
    model.zero_grad()
    run(model, case).float().square().mean().backward()
    model.eval()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant,case", PAIRS)
def test_outputs_and_gradients_match_hf(variant, case):
    hf, fp = pair(variant, case)
    hf_out = run(hf, case).detach()
    assert (hf_out - models.forward(base(case), inputs(case))).abs().max() > 1e-3, "adapter changes nothing"
    close(run(fp, case).detach(), hf_out, "outputs")
    hg, fg = _grads(hf, case), _grads(fp, case)
    assert hg.keys() == fg.keys()
    for name in hg:
        close(fg[name], hg[name], f"grad of {name}")
    for key, value in adapter_state(hf).items():  # VeLoRA's projection, updated by the training forward
        close(fp.state_dict()[key], value, key)


def test_velora_backward_uses_the_compressed_input():
    """The A gradient differs from plain LoRA's (the projection is lossy) while the input's gradient is
    exact."""
    fp = build(fastpeft, "velora", "mlp")
    x = models.mlp_inputs().requires_grad_(True)
    fp.train()
    fp(x).square().mean().backward()
    a = fp.base_model.model.lin1.lora_A["default"].weight
    grad_a, grad_x = a.grad.clone(), x.grad.clone()
    plain = build(fastpeft, "velora", "mlp")
    for m in plain.modules():  # the same adapter without the variant: exact LoRA backward
        if hasattr(m, "lora_variant"):
            m.lora_variant.clear()
    x2 = models.mlp_inputs().requires_grad_(True)
    plain.train()
    plain(x2).square().mean().backward()
    assert (plain.base_model.model.lin1.lora_A["default"].weight.grad - grad_a).abs().max() > 1e-4
    close(grad_x, x2.grad, "input gradient")


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("variant,case", PAIRS)
def test_merge_unmerge_and_merge_and_unload_match_hf(variant, case):
    hf, fp = pair(variant, case)
    before = run(fp, case).detach()
    hf.merge_adapter()
    fp.merge_adapter()
    close(run(fp, case).detach(), before, "merged vs unmerged")
    close(run(fp, case).detach(), run(hf, case).detach(), "merged outputs")
    fp.unmerge_adapter()
    close(run(fp, case).detach(), before, "after unmerge")
    hf.unmerge_adapter()
    hs, fs = hf.state_dict(), fp.state_dict()
    for key in hs:
        close(fs[key], hs[key], f"{key} after unmerge")
    hm, fm = hf.merge_and_unload(), fp.merge_and_unload()
    close(models.forward(fm, inputs(case)), models.forward(hm, inputs(case)), "merge_and_unload")
    hs, fs = hm.state_dict(), fm.state_dict()
    assert hs.keys() == fs.keys()
    for key in hs:
        close(fs[key], hs[key], f"merged {key}")


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("variant,case", PAIRS)
def test_files_both_directions(variant, case, tmp_path):
    hf, fp = pair(variant, case)
    if variant.startswith("velora"):  # a training forward sets the batch-average projection
        _grads(hf, case), _grads(fp, case)
    hf.save_pretrained(str(tmp_path / "hf"))
    fp.save_pretrained(str(tmp_path / "fp"))
    hf_file = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    fp_file = load_file(str(tmp_path / "fp" / "adapter_model.safetensors"))
    assert hf_file.keys() == fp_file.keys()
    for key in hf_file:
        close(fp_file[key], hf_file[key], key)
    hf_cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    fp_cfg = json.loads((tmp_path / "fp" / "adapter_config.json").read_text())
    for key in ("init_lora_weights", "kasa_config", "velora_config"):
        assert fp_cfg[key] == hf_cfg[key], key
    expected = run(hf, case).detach()
    fp_loaded = fastpeft.PeftModel.from_pretrained(base(case), str(tmp_path / "hf")).eval()
    close(run(fp_loaded, case).detach(), expected, "fastpeft loading HF's file")
    hf_loaded = peft.PeftModel.from_pretrained(base(case), str(tmp_path / "fp")).eval()
    close(run(hf_loaded, case).detach(), expected, "HF loading fastpeft's file")
    if case != "mlp":
        return
    trainable = fastpeft.PeftModel.from_pretrained(base(case), str(tmp_path / "hf"), is_trainable=True)
    hf_trainable = peft.PeftModel.from_pretrained(base(case), str(tmp_path / "fp"), is_trainable=True)
    assert ({n for n, p in trainable.named_parameters() if p.requires_grad}
            == {n for n, p in hf_trainable.named_parameters() if p.requires_grad})


# ---------------------------------------------------------------------------------------------- KaSA loss
def test_kasa_loss_matches_hf():
    hf, fp = pair("kasa", "llama")
    expected = hf.base_model._get_kasa_loss()
    close(kasa_loss(fp), expected, "kasa loss")
    close(kasa_loss(fp.base_model, "default"), expected, "kasa loss on the LoraModel")
    assert kasa_loss(build(fastpeft, "mica", "mlp")) == 0.0


# ---------------------------------------------------------------------------------------------- refusals
def _both_refuse(variant, case, match, **extra):
    """HF PEFT refuses the setup (any error); fastpeft refuses it with a message matching `match`."""
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(models.MODELS[case][0](), _hf_config(variant, **extra))
    with pytest.raises((ValueError, TypeError), match=match):
        fastpeft.get_peft_model(models.MODELS[case][0](), _fp_config(variant, **extra))


def _hf_config(variant, **extra):
    return peft.LoraConfig(**{"r": 4, **VARIANTS[variant](peft), **extra})


def _fp_config(variant, **extra):
    return fastpeft.LoraConfig(**{"r": 4, **VARIANTS[variant](fastpeft), **extra})


@pytest.mark.parametrize("variant,case,targets,match", [
    ("mica", "conv2d", ["conv0"], "not supported on conv"),
    ("kasa", "emb", ["emb"], "not supported on embedding"),
    ("kasa", "conv2d", ["conv0"], "not supported on conv"),
    ("kasa", "mha", ["mha"], "not supported on nn.MultiheadAttention"),
    ("velora", "emb", ["emb"], "not supported on embedding"),
    ("velora", "conv1d", ["conv0"], "not supported on conv"),
    ("kasa", "conv1d_gpt2", ["c_fc"], "fan_in_fan_out"),
])
def test_unsupported_layer_kinds(variant, case, targets, match):
    _both_refuse(variant, case, match, target_modules=targets)


@pytest.mark.parametrize("variant,extra,match", [
    ("mica", {"r": 12}, "r <= min"),  # lin0 is 10 -> 20
    ("kasa", {"r": 10}, "r < min"),
    ("mica", {"use_dora": True}, "cannot be combined"),
    ("kasa", {"use_dora": True}, "cannot be combined"),
    ("mica", {"lora_bias": True}, "lora_bias"),
])
def test_bad_combinations(variant, extra, match):
    _both_refuse(variant, "mlp", match, target_modules=["lin0"], **extra)


def test_combining_two_variants_is_refused():
    kw = dict(target_modules=["lin0"], init_lora_weights="mica")
    with pytest.raises(ValueError):
        peft.get_peft_model(models.make_mlp(), peft.LoraConfig(velora_config=peft.VeloraConfig(), **kw))
    with pytest.raises(ValueError, match="cannot be combined"):
        fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(velora_config=VeloraConfig(), **kw))


@pytest.mark.parametrize("name,kw,match", [
    ("VeloraConfig", {"num_groups": 0}, "num_groups"),
    ("VeloraConfig", {"scale": 0.0}, "scale"),
    ("VeloraConfig", {"init_type": "mean"}, "init_type"),
    ("KasaConfig", {"beta": -1.0}, "beta"),
    ("KasaConfig", {"gamma": -1.0}, "gamma"),
])
def test_bad_sub_configs(name, kw, match):
    with pytest.raises(ValueError):
        getattr(peft, name)(**kw)
    with pytest.raises(ValueError, match=match):
        _sub(fastpeft, name, **kw)
    option = "kasa_config" if name == "KasaConfig" else "velora_config"
    with pytest.raises(ValueError, match=match):  # also from a file's dict
        fastpeft.LoraConfig(**{option: kw})


@pytest.mark.parametrize("option", ["kasa_config", "velora_config"])
def test_sub_config_types(option):
    with pytest.raises(TypeError):
        peft.LoraConfig(**{option: 3})
    with pytest.raises(TypeError, match=option):
        fastpeft.LoraConfig(**{option: 3})
    cfg = fastpeft.LoraConfig(**{option: {}})  # a file's dict becomes the sub-config
    assert (type(getattr(cfg, option)).__name__
            == type(getattr(peft.LoraConfig(**{option: {}}), option)).__name__)


@pytest.mark.parametrize("variant", ["mica", "kasa", "velora_random"])
def test_half_precision_base_matches_hf(variant):
    """bf16 base: adapter tensors upcast to float32 as HF PEFT (VeLoRA's buffer too); same weights -> same
    results."""
    hf, fp = (lib.get_peft_model(models.make_mlp().to(torch.bfloat16), config(lib, variant, "mlp"))
              for lib in (peft, fastpeft))
    hs = hf.state_dict()
    assert {k: v.dtype for k, v in hs.items()} == {k: v.dtype for k, v in fp.state_dict().items()}
    fp.load_state_dict(hs)
    x = models.mlp_inputs().to(torch.bfloat16)
    grads = []
    for model in (hf, fp):
        model.train()
        model(x).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        close(grads[1][name], grads[0][name], name)
    close(fp.eval()(x), hf.eval()(x), "bf16 outputs")


def test_kasa_and_plain_adapters_do_not_mix():
    """HF PEFT refuses a plain adapter next to a KaSA one (and the reverse); kasa.check_new_adapter does
    too."""
    from fastpeft.methods.lora.variants.kasa import check_new_adapter

    hf, fp = pair("kasa", "mlp")
    with pytest.raises(ValueError):
        hf.add_adapter("plain", peft.LoraConfig(target_modules=["lin0"], r=4))
    with pytest.raises(ValueError, match="KaSA"):
        check_new_adapter(fp.peft_config, fastpeft.LoraConfig(target_modules=["lin0"], r=4))
    check_new_adapter(fp.peft_config, config(fastpeft, "kasa", "mlp"))  # KaSA next to KaSA is fine
    plain = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=["lin0"], r=4))
    with pytest.raises(ValueError, match="KaSA"):
        check_new_adapter(plain.peft_config, config(fastpeft, "kasa", "mlp"))


def test_velora_delete_adapter_drops_its_buffer():
    fp = build(fastpeft, "velora", "mlp")
    fp.add_adapter("other", config(fastpeft, "velora", "mlp"))
    assert any(k.endswith("lora_velora_embed.other") for k in fp.state_dict())
    fp.delete_adapter("other")
    assert not any(k.endswith(".other") for k in fp.state_dict())
    assert any(k.endswith("lora_velora_embed.default") for k in fp.state_dict())


def test_kasa_and_plain_adapters_cannot_share_a_model_as_in_hf():
    for lib in (peft, fastpeft):
        model = build(lib, "kasa", "mlp", perturb=False)
        with pytest.raises(ValueError):
            model.add_adapter("plain", lib.LoraConfig(r=4, target_modules=["lin0"]))
    model = build(fastpeft, "kasa", "mlp", perturb=False)
    with pytest.raises(ValueError, match="KaSA and non-KaSA adapters cannot share a model"):
        model.add_adapter("plain", fastpeft.LoraConfig(r=4, target_modules=["lin0"]))
    assert list(model.peft_config) == ["default"]
    close(model.base_model._get_kasa_loss(), kasa_loss(model), "LoraModel._get_kasa_loss")


def test_set_requires_grad_keeps_mica_b_frozen():
    model = build(fastpeft, "mica", "mlp", perturb=False)
    model.set_requires_grad("default", False)
    model.set_requires_grad("default", True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n for n in trainable)
