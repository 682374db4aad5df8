"""FourierFT against HF PEFT 0.21.2: seeded init and spectral locations, files both ways, outputs, gradients,
merging, several adapters, mixed batches, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods.fourierft import FourierFTConfig, FourierFTModel  # noqa: E402

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], n_frequency=30)),
    "mlp_options": ("mlp", dict(target_modules=["lin0", "lin1"], n_frequency=25, scaling=12.5, random_loc_seed=3,
                                init_weights=True, bias="fourier_only")),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], n_frequency=40)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", n_frequency=50, n_frequency_pattern={"v_proj": 20})),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", n_frequency=60, bias="all")),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", n_frequency=40)),
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", n_frequency=16)),
}


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    return (peft.FourierFTConfig if lib is peft else FourierFTConfig)(**kw)


def factory(case):
    return models.MODELS[CASES[case][0]][0]


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    """A FourierFT model of `lib` (the global RNG in the same state for both libraries), trainables perturbed."""
    base = factory(case)()
    torch.manual_seed(7)
    model = lib.get_peft_model(base, config(lib, case, **extra))
    return models.perturb(model, seed, 0.3).eval()


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def differs(a, b):
    assert (a - b).abs().max().item() > 1e-3, "the adapter does not change the outputs"


def _json(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.pop("peft_version")
    return {k: sorted(map(str, v)) if isinstance(v, list) else v for k, v in cfg.items()}


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "mlp_options"])
def test_seeded_init_and_locations_match_hf(case):
    """Same seeds: the same spectrum values and the same spectral locations in every layer."""
    base = factory(case)()
    torch.manual_seed(7)
    hf = peft.get_peft_model(base, config(peft, case))
    base = factory(case)()
    torch.manual_seed(7)
    fp = fastpeft.get_peft_model(base, config(fastpeft, case))
    hf_sd, fp_sd = hf.state_dict(), fp.state_dict()
    assert set(hf_sd) == set(fp_sd)
    for key in hf_sd:
        assert torch.equal(hf_sd[key], fp_sd[key]), key
    hf_layers = _layers(hf, peft.tuners.fourierft.FourierFTLayer)
    fp_layers = _layers(fp, fastpeft.core.layer.AdapterLayer)
    assert set(hf_layers) == set(fp_layers) and hf_layers
    for name, layer in hf_layers.items():
        assert torch.equal(layer.indices["default"], fp_layers[name].indices["default"]), name
        assert layer.fourierft_n_frequency == fp_layers[name].fourierft_n_frequency, name
    if CASES[case][1].get("init_weights"):
        close(models.forward(fp, inputs(case)), models.forward(factory(case)(), inputs(case)), "identity at init")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF save -> fastpeft load and fastpeft save -> HF load give the same outputs, keys, values and config."""
    hf = build(peft, case)
    hf_out = models.forward(hf, inputs(case))
    differs(hf_out, models.forward(factory(case)(), inputs(case)))
    hf.save_pretrained(str(tmp_path / "hf"))
    fp = fastpeft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "hf")).eval()
    close(models.forward(fp, inputs(case)), hf_out, "fastpeft(HF adapter) vs HF")
    fp.save_pretrained(str(tmp_path / "fp"))
    hf_sd = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    fp_sd = load_file(str(tmp_path / "fp" / "adapter_model.safetensors"))
    assert set(fp_sd) == set(hf_sd) and any(".fourierft_spectrum" in k for k in hf_sd)
    for key in hf_sd:
        assert torch.equal(fp_sd[key], hf_sd[key]), key
    assert _json(tmp_path / "fp") == _json(tmp_path / "hf")
    back = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "fp")).eval()
    close(models.forward(back, inputs(case)), hf_out, "HF(fastpeft adapter) vs HF")


def test_fastpeft_built_adapter_loads_in_hf(tmp_path):
    """An adapter created and perturbed by fastpeft alone: HF PEFT loads it and computes the same outputs."""
    fp = build(fastpeft, "llama", seed=3)
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(factory("llama")(), str(tmp_path)).eval()
    close(models.forward(hf, inputs("llama")), models.forward(fp, inputs("llama")), "HF(fastpeft) vs fastpeft")


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "gpt2"])
def test_training_step_gradients_match_hf(case):
    hf, fp = build(peft, case), build(fastpeft, case)
    x = inputs(case)
    grads = []
    for model in (hf, fp):
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both
        out = model(**x) if isinstance(x, dict) else model(x)
        out = out.logits if hasattr(out, "logits") else out
        (out.float() ** 2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    hf_g, fp_g = grads
    assert set(fp_g) == set(hf_g) and any("fourierft_spectrum" in k for k in hf_g)
    for key in hf_g:
        close(fp_g[key], hf_g[key], f"grad {key}", atol=1e-4)
    assert max(g.abs().max().item() for g in fp_g.values()) > 1e-5


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case, random_loc_seed=11))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = _two_adapters(peft, case), _two_adapters(fastpeft, case)
    base = {n: p.detach().clone() for n, p in fp.named_parameters() if "base_layer" in n}
    x = inputs(case)
    for model in (hf, fp):
        model.base_model.set_adapter(["default", "other"])
    both = models.forward(hf, x)
    close(models.forward(fp, x), both, "two active adapters")
    for model in (hf, fp):
        model.merge_adapter()
    close(models.forward(fp, x), both, "merged (two)", atol=1e-4)
    hf_w = {n: p for n, p in hf.named_parameters() if "base_layer" in n}
    for n, p in fp.named_parameters():
        if n in base:
            close(p, hf_w[n], f"merged {n}")
    for model in (hf, fp):
        model.unmerge_adapter()
    for n, p in fp.named_parameters():
        if n in base:
            close(p, base[n], f"restored {n}", atol=1e-6)
    merged = fp.merge_and_unload(safe_merge=True)
    hf_merged = hf.merge_and_unload(safe_merge=True)
    assert {type(m) for m in merged.modules()} == {type(m) for m in hf_merged.modules()}
    close(models.forward(merged, x), models.forward(hf_merged, x), "merge_and_unload vs HF", atol=1e-4)


def test_disable_set_delete_and_mixed_batch_match_hf():
    hf, fp = _two_adapters(peft, "llama"), _two_adapters(fastpeft, "llama")
    x = inputs("llama")
    base = models.forward(factory("llama")(), x)
    with fp.disable_adapter():
        close(models.forward(fp, x), base, "disabled")
    for name in ("other", "default"):
        hf.set_adapter(name)
        fp.set_adapter(name)
        close(models.forward(fp, x), models.forward(hf, x), f"adapter {name}")
    mixed = models.forward(fp, {**x, "adapter_names": ["other", "__base__"]})
    hf.set_adapter("other")
    close(mixed[:1], models.forward(hf, {k: v[:1] for k, v in x.items()}), "row 0 (other)")
    close(mixed[1:], base[1:], "row 1 (base)")
    hf.delete_adapter("other")
    fp.delete_adapter("other")
    assert not any(".other" in k for k in fp.state_dict())
    close(models.forward(fp, x), models.forward(hf, x), "after delete")


def test_n_frequency_pattern_follows_hf_lookup():
    """HF matches pattern keys as `.*\\.<key>$` on the full name, then the full name itself."""
    cfg = dict(target_modules=["lin0", "lin1"], n_frequency=30, n_frequency_pattern={"lin0": 5, "lin1": 7})
    hf = peft.get_peft_model(models.make_mlp(), peft.FourierFTConfig(**cfg))
    fp = fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(**cfg))
    for name in ("lin0", "lin1"):
        hf_n = hf.base_model.model.get_submodule(name).fourierft_n_frequency["default"]
        assert fp.base_model.model.get_submodule(name).fourierft_n_frequency["default"] == hf_n


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="n_frequency=500 exceeds"):
        fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(target_modules=["lin0"], n_frequency=500))
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), FourierFTConfig(target_modules=["emb"], n_frequency=5))
    with pytest.raises(ValueError, match="bias must be one of"):
        FourierFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="random_loc_seed"):
        fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(target_modules=["lin0"], random_loc_seed=None,
                                                                   n_frequency=5))
    model = fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(target_modules=["lin0"], n_frequency=5))
    assert isinstance(model.base_model, FourierFTModel)
