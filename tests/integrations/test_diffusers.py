"""fastpeft LoRA on tiny Diffusers models (UNet2DConditionModel, SD3Transformer2DModel), checked against HF
PEFT.

Covers get_peft_model and inject_adapter_in_model, training, save/load, files, state-dict helpers and merging.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json

import diffusers
import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft

ATOL = 1e-5
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        sample_size=8, norm_num_groups=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 700]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 700]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 16, generator=g)}


MODELS = {"unet": (tiny_unet, unet_inputs), "sd3": (tiny_sd3, sd3_inputs)}
_BASES: dict[str, torch.nn.Module] = {}

CASES = {
    "unet_attn": ("unet", dict(target_modules=ATTN, r=4, lora_alpha=8)),
    "unet_conv": ("unet", dict(target_modules=ATTN + ["conv1", "conv2", "proj_in"], r=4, lora_alpha=4)),
    "unet_regex": ("unet", dict(target_modules=r".*attn[12]\.to_(q|v)|.*resnets\.\d+\.time_emb_proj", r=2)),
    "unet_all_linear": ("unet", dict(target_modules="all-linear", r=2, lora_alpha=4)),
    "sd3_attn": ("sd3", dict(target_modules=ATTN, r=4, lora_alpha=8)),
    "sd3_all_linear": ("sd3", dict(target_modules="all-linear", r=2, lora_alpha=2)),
    "sd3_conv_patterns": ("sd3", dict(  # as diffusers' loaders build configs: full-name rank / alpha patterns
        target_modules=ATTN + ["add_k_proj", "pos_embed.proj", "proj_out"], r=4, lora_alpha=4,
        rank_pattern={"transformer_blocks.1.attn.to_k": 2}, alpha_pattern={"pos_embed.proj": 8})),
}
CASE_IDS = list(CASES)


pytestmark = pytest.mark.usefixtures("one_thread")


def base(kind):
    """A fresh copy of the (seeded, cached) tiny base model `kind`."""
    if kind not in _BASES:
        _BASES[kind] = MODELS[kind][0]()
    return copy.deepcopy(_BASES[kind])


def config(lib, case_id):
    return lib.LoraConfig(**copy.deepcopy(CASES[case_id][1]))


def out(model, x):
    with torch.no_grad():
        return model(**x).sample


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                n += 1
    assert n > 0
    return model


def close(a, b, what=""):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def differs(a, b, what=""):
    assert (a - b).abs().max().item() > 1e-4, f"{what}: the adapter does not change the outputs"


def lora_layer_names(model):
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


# ------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_targets_match_hf_peft_and_identity_at_init(case_id):
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    ref = out(base(kind), x)
    fp = fastpeft.get_peft_model(base(kind), config(fastpeft, case_id))
    hf = peft.get_peft_model(base(kind), config(peft, case_id))
    assert type(fp) is fastpeft.PeftModel
    assert lora_layer_names(fp) == lora_layer_names(hf) and lora_layer_names(fp)
    fp_trainable = {n for n, p in fp.named_parameters() if p.requires_grad}
    assert fp_trainable == {n for n, p in hf.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in fp_trainable)
    close(out(fp, x), ref, "get_peft_model at init")
    injected = fastpeft.inject_adapter_in_model(config(fastpeft, case_id), base(kind))
    hf_injected = peft.inject_adapter_in_model(config(peft, case_id), base(kind))
    assert isinstance(injected, type(_BASES[kind]))
    assert lora_layer_names(injected) == lora_layer_names(hf_injected)
    assert {n for n, p in injected.named_parameters() if p.requires_grad} == {
        n for n, p in hf_injected.named_parameters() if p.requires_grad}
    close(out(injected, x), ref, "inject_adapter_in_model at init")


def test_conv_layers_get_conv_adapters():
    model = fastpeft.get_peft_model(base("unet"), config(fastpeft, "unet_conv")).get_base_model()
    layer = model.down_blocks[0].resnets[0].conv1
    assert isinstance(layer.base_layer, torch.nn.Conv2d)
    assert isinstance(layer.lora_A["default"], torch.nn.Conv2d)
    assert layer.lora_A["default"].kernel_size == (3, 3) and layer.lora_B["default"].kernel_size == (1, 1)
    assert isinstance(model.down_blocks[0].attentions[0].proj_in.base_layer, torch.nn.Conv2d)


def test_no_default_targets_for_diffusers_models():
    # like HF PEFT (which fails with a KeyError on 'model_type'), diffusers models have no default
    # target_modules
    with pytest.raises((ValueError, KeyError)):
        peft.get_peft_model(base("unet"), peft.LoraConfig(r=4))
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(base("unet"), fastpeft.LoraConfig(r=4))


# ------------------------------------------------------------------------------------------- forward


def test_forward_kwargs_pass_through_peft_model():
    x = unet_inputs()
    model = perturb(fastpeft.get_peft_model(base("unet"), config(fastpeft, "unet_attn")))
    by_kw = model(sample=x["sample"], timestep=x["timestep"],
                  encoder_hidden_states=x["encoder_hidden_states"])
    assert isinstance(by_kw, diffusers.models.unets.unet_2d_condition.UNet2DConditionOutput)
    positional = model(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
    close(positional, by_kw.sample, "positional vs keyword")
    as_tuple = model(**x, return_dict=False)
    assert isinstance(as_tuple, tuple)
    close(as_tuple[0], by_kw.sample, "return_dict=False")
    close(model.get_base_model()(**x).sample, by_kw.sample, "PeftModel vs its base model")
    params = inspect.signature(model.forward).parameters
    assert {"sample", "timestep", "encoder_hidden_states", "return_dict"} <= set(params)
    with model.disable_adapter():
        close(out(model, x), out(base("unet"), x), "disable_adapter")
    sd3 = perturb(fastpeft.get_peft_model(base("sd3"), config(fastpeft, "sd3_attn")))
    x3 = sd3_inputs()
    close(sd3(**x3).sample, sd3.get_base_model()(**x3).sample, "SD3 through PeftModel")


# ------------------------------------------------------------------------------------------- training


def _train_step(model, x, params):
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pred = model(**x).sample
    loss = torch.nn.functional.mse_loss(pred, torch.randn_like(pred))
    loss.backward()
    opt.step()
    model.eval()
    return before


@pytest.mark.parametrize("entry", ["get_peft_model", "inject_adapter_in_model"])
@pytest.mark.parametrize("case_id", ["unet_conv", "sd3_conv_patterns"])
def test_one_training_step_changes_only_adapters(case_id, entry):
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    if entry == "get_peft_model":
        model = fastpeft.get_peft_model(base(kind), config(fastpeft, case_id))
    else:
        model = fastpeft.inject_adapter_in_model(config(fastpeft, case_id), base(kind))
    start = out(model, x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = _train_step(model, x, trainable)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed), sorted(changed)[:5]
    assert any(".lora_B." in n for n in changed)
    differs(out(model, x), start, "after one step")


# ------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("case_id", ["unet_conv", "sd3_all_linear"])
def test_save_and_load_back(case_id, tmp_path):
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    model = perturb(fastpeft.get_peft_model(base(kind), config(fastpeft, case_id)))
    expected = out(model, x)
    differs(expected, out(base(kind), x), "perturbed adapter")
    model.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(base(kind), tmp_path)
    close(out(loaded, x), expected, "reloaded")
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = fastpeft.PeftModel.from_pretrained(base(kind), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def _configs_equal(fp_dir, hf_dir):
    fp_cfg = json.loads((fp_dir / "adapter_config.json").read_text())
    hf_cfg = json.loads((hf_dir / "adapter_config.json").read_text())
    assert set(fp_cfg) == set(hf_cfg), set(fp_cfg) ^ set(hf_cfg)
    for key in hf_cfg:
        if key == "peft_version":
            continue
        a, b = fp_cfg[key], hf_cfg[key]
        if isinstance(a, list) and isinstance(b, list):
            a, b = set(a), set(b)
        assert a == b, f"adapter_config.json field {key!r}: fastpeft {a!r} vs HF PEFT {b!r}"
    return fp_cfg


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_hf_peft_adapter_loads_in_fastpeft(case_id, tmp_path):
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    hf = perturb(peft.get_peft_model(base(kind), config(peft, case_id)))
    expected = out(hf, x)
    differs(expected, out(base(kind), x), "HF PEFT adapter")
    hf.save_pretrained(tmp_path)
    fp = fastpeft.PeftModel.from_pretrained(base(kind), tmp_path)
    close(out(fp, x), expected, "fastpeft loading an HF PEFT adapter")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_fastpeft_adapter_loads_in_hf_peft_and_files_match(case_id, tmp_path):
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    fp = perturb(fastpeft.get_peft_model(base(kind), config(fastpeft, case_id)))
    expected = out(fp, x)
    fp_dir, hf_dir = tmp_path / "fp", tmp_path / "hf"
    fp.save_pretrained(fp_dir)
    hf = peft.PeftModel.from_pretrained(base(kind), fp_dir)
    close(out(hf, x), expected, "HF PEFT loading a fastpeft adapter")
    peft.get_peft_model(base(kind), config(peft, case_id)).save_pretrained(hf_dir)
    fp_t, hf_t = (load_file(d / "adapter_model.safetensors") for d in (fp_dir, hf_dir))
    assert set(fp_t) == set(hf_t)
    assert {k: tuple(v.shape) for k, v in fp_t.items()} == {k: tuple(v.shape) for k, v in hf_t.items()}
    saved = _configs_equal(fp_dir, hf_dir)
    cls = type(_BASES[kind])
    assert saved["auto_mapping"] == {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    assert saved["task_type"] is None


def test_long_target_lists_are_condensed_like_hf_peft(tmp_path):
    """diffusers' loaders pass every adapted module's full name; HF PEFT condenses lists of >= 20 names to
    the shortest suffixes that still separate them from the other modules, and saves that in the config."""
    names = sorted({n for n, m in _BASES.setdefault("unet", tiny_unet()).named_modules()
                    if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"))})
    assert len(names) >= 20
    hf = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=list(names)), base("unet"))
    fp = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(target_modules=list(names)), base("unet"))
    assert lora_layer_names(fp) == lora_layer_names(hf) == set(names)
    hf_targets = set(hf.peft_config["default"].target_modules)
    assert len(hf_targets) < len(names)
    assert set(fp.peft_config["default"].target_modules) == hf_targets


# ----------------------------------------------------------------------------------------- state-dict helpers


@pytest.mark.parametrize("case_id", ["unet_conv", "sd3_conv_patterns", "sd3_all_linear"])
def test_state_dict_helpers_on_injected_model(case_id):
    """The diffusers loader path: inject_adapter_in_model + get/set_peft_model_state_dict, keys without
    prefix."""
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    fp = perturb(fastpeft.inject_adapter_in_model(config(fastpeft, case_id), base(kind),
                                                  adapter_name="pokemon"))
    hf = perturb(peft.inject_adapter_in_model(config(peft, case_id), base(kind), adapter_name="pokemon"),
                 seed=1)
    fp_sd = fastpeft.get_peft_model_state_dict(fp, adapter_name="pokemon")
    hf_sd = peft.get_peft_model_state_dict(hf, adapter_name="pokemon")
    assert set(fp_sd) == set(hf_sd) and fp_sd
    assert not any(k.startswith("base_model.") or "pokemon" in k for k in fp_sd)
    assert {k: v.shape for k, v in fp_sd.items()} == {k: v.shape for k, v in hf_sd.items()}

    # fastpeft round trip onto a fresh injected model
    fresh = fastpeft.inject_adapter_in_model(config(fastpeft, case_id), base(kind), adapter_name="pokemon")
    result = fastpeft.set_peft_model_state_dict(fresh, fp_sd, adapter_name="pokemon")
    assert not result.missing_keys and not result.unexpected_keys
    close(out(fresh, x), out(fp, x), "fastpeft state-dict round trip")
    for k, v in fastpeft.get_peft_model_state_dict(fresh, adapter_name="pokemon").items():
        assert torch.equal(v, fp_sd[k]), k

    # HF PEFT tensors -> fastpeft, fastpeft tensors -> HF PEFT
    from_hf = fastpeft.inject_adapter_in_model(config(fastpeft, case_id), base(kind), adapter_name="pokemon")
    result = fastpeft.set_peft_model_state_dict(from_hf, hf_sd, adapter_name="pokemon")
    assert not result.unexpected_keys
    close(out(from_hf, x), out(hf, x), "HF PEFT state dict in fastpeft")
    to_hf = peft.inject_adapter_in_model(config(peft, case_id), base(kind), adapter_name="pokemon")
    hf_result = peft.set_peft_model_state_dict(to_hf, fp_sd, adapter_name="pokemon")
    assert not hf_result.unexpected_keys
    close(out(to_hf, x), out(fp, x), "fastpeft state dict in HF PEFT")
    differs(out(fp, x), out(hf, x), "two differently perturbed adapters")


def test_set_state_dict_refuses_wrong_shapes():
    fp = fastpeft.inject_adapter_in_model(config(fastpeft, "unet_attn"), base("unet"))
    sd = fastpeft.get_peft_model_state_dict(fp)
    key = next(k for k in sd if ".lora_A." in k)
    before = {k: v.clone() for k, v in sd.items()}
    bad = {k: torch.ones_like(v) for k, v in sd.items()}
    bad[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    with pytest.raises(ValueError, match="shape"):
        fastpeft.set_peft_model_state_dict(fp, bad)
    for k, v in fastpeft.get_peft_model_state_dict(fp).items():
        assert torch.equal(v, before[k]), f"{k} was written before the shape check failed"


# ------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("case_id", ["unet_conv", "sd3_conv_patterns"])
def test_merge_and_unload_keeps_outputs(case_id):
    kind, _ = CASES[case_id]
    x = MODELS[kind][1]()
    model = perturb(fastpeft.get_peft_model(base(kind), config(fastpeft, case_id)))
    expected = out(model, x)
    differs(expected, out(base(kind), x), "perturbed adapter")
    hf = peft.get_peft_model(base(kind), config(peft, case_id))
    hf.load_state_dict(model.state_dict())
    merged = model.merge_and_unload()
    assert type(merged) is type(_BASES[kind])
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(_BASES[kind].state_dict())
    torch.testing.assert_close(out(merged, x), expected, atol=1e-4, rtol=0)
    close(out(merged, x), out(hf.merge_and_unload(), x), "merged fastpeft vs merged HF PEFT")


def test_merge_unmerge_layers_of_injected_model():
    """diffusers' fuse_lora / unfuse_lora call merge() / unmerge() on each adapter layer of an injected
    model."""
    from fastpeft.core.layer import AdapterLayer

    x = unet_inputs()
    model = perturb(fastpeft.inject_adapter_in_model(config(fastpeft, "unet_conv"), base("unet")))
    expected = out(model, x)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    weights = {id(m): m.get_base_layer().weight.detach().clone() for m in layers}
    for layer in layers:
        layer.merge(safe_merge=True, adapter_names=["default"])
    assert all(layer.merged for layer in layers)
    assert not all(torch.equal(m.get_base_layer().weight, weights[id(m)]) for m in layers)
    torch.testing.assert_close(out(model, x), expected, atol=1e-4, rtol=0)
    for layer in layers:
        layer.unmerge()
    for m in layers:
        torch.testing.assert_close(m.get_base_layer().weight, weights[id(m)], atol=1e-6, rtol=0)
    close(out(model, x), expected, "after unmerge")


# --------------------------------------------------------------------------------------- diffusers' layer API
# diffusers drives adapter layers directly: set_adapter(list) + set_scale per adapter (set_adapters weights),
# scale_layer / unscale_layer around a forward (lora_scale), scale_layer + merge(safe_merge=, adapter_names=)
# / unmerge (fuse_lora / unfuse_lora). The same calls on fastpeft's and HF PEFT's layers must agree.

SCALED_METHODS = {
    "lora": lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN),
    "lora_rslora": lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_rslora=True),
    "dora": lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], use_dora=True),
    "lokr": lambda lib: lib.LoKrConfig(r=4, alpha=2, target_modules=["to_q", "to_v"]),
    "loha": lambda lib: lib.LoHaConfig(r=4, alpha=8, target_modules=["to_q", "to_v"]),
}

LAYER_STEPS = [
    ("set_adapter", lambda m: m.set_adapter(["a", "b"])),
    ("set_scale", lambda m: (m.set_scale("a", 0.3), m.set_scale("b", 2.0), m.set_scale("missing", 5.0))),
    ("scale_layer", lambda m: m.scale_layer(0.5)),
    ("unscale_layer(0.5)", lambda m: m.unscale_layer(0.5)),
    ("unscale_layer()", lambda m: m.unscale_layer()),
    ("set_scale 0", lambda m: m.set_scale("b", 0.0)),
    ("scale_layer + merge a", lambda m: (m.scale_layer(0.7), m.merge(safe_merge=True, adapter_names=["a"]))),
    ("unmerge", lambda m: m.unmerge()),
]


def _injected_pair(method):
    fp, hf = base("unet"), base("unet")
    for name in ("a", "b"):
        fp = fastpeft.inject_adapter_in_model(SCALED_METHODS[method](fastpeft), fp, adapter_name=name)
        hf = peft.inject_adapter_in_model(SCALED_METHODS[method](peft), hf, adapter_name=name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sorted(fp.named_parameters()):
            if any(t in name for t in (".lora_", ".lokr_", ".hada_")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    for name in ("a", "b"):
        sd = fastpeft.get_peft_model_state_dict(fp, adapter_name=name)
        result = peft.set_peft_model_state_dict(hf, sd, adapter_name=name)
        assert not result.unexpected_keys
    return fp, hf


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("method", list(SCALED_METHODS))
def test_layer_scale_merge_calls_match_hf_peft(method):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fastpeft.core.layer import AdapterLayer

    x = unet_inputs()
    fp, hf = _injected_pair(method)
    fp_layers, hf_layers = _layers(fp, AdapterLayer), _layers(hf, BaseTunerLayer)
    assert set(fp_layers) == set(hf_layers) and fp_layers
    start = out(fp, x)
    for what, step in LAYER_STEPS:
        for name in fp_layers:
            step(fp_layers[name])
            step(hf_layers[name])
        for name, layer in fp_layers.items():
            assert layer.scaling == pytest.approx(hf_layers[name].scaling), (
                f"{method}, {what}: scaling of {name}")
            assert layer.merged_adapters == hf_layers[name].merged_adapters
            close(layer.get_base_layer().weight, hf_layers[name].get_base_layer().weight, f"{what}: {name}")
        close(out(fp, x), out(hf, x), f"{method}, after {what}")
    differs(out(fp, x), start, f"{method}: the scale calls")


@pytest.mark.parametrize("lib", [fastpeft, peft], ids=["fastpeft", "hf"])
def test_disable_input_dtype_casting_with_layerwise_cast_adapter_weights(lib):
    """Adapter weights stored in bf16 and upcast to fp32 just before each runs (diffusers' layerwise casting
    on the LoRA modules): casting the input to the stored dtype fails; inside disable_input_dtype_casting the
    fp32 input reaches the upcast weights. Both libraries behave the same, with the same numbers."""
    from diffusers.hooks import apply_layerwise_casting

    x = unet_inputs()
    model = perturb(lib.inject_adapter_in_model(config(lib, "unet_attn"), base("unet")))
    expected = out(model, x)
    for name, module in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            apply_layerwise_casting(module, storage_dtype=torch.bfloat16, compute_dtype=torch.float32,
                                    skip_modules_pattern=())
    with pytest.raises(RuntimeError, match="dtype"):
        out(model, x)
    with importlib.import_module(f"{lib.__name__}.helpers").disable_input_dtype_casting(model):
        got = out(model, x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # only the adapter weights were rounded
    with pytest.raises(RuntimeError, match="dtype"):
        out(model, x)  # the layers cast again after the block
