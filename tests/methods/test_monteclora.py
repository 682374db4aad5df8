"""MonteCLoRA (`monteclora_config`) against HF PEFT.

Training mode samples: both libraries pre-draw the same random numbers in the same order (when the adapter is
built and whenever `buffer_size` forward passes used them up), so with the same seed the training outputs,
regulariser, gradients and saved sampler state agree step by step. Eval mode and merging are plain LoRA.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.config import MontecloraConfig as HFMontecloraConfig
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.variants.monteclora import MontecloraConfig, MontecloraSampler

import models

ATOL = 1e-5
# a large sample_scaler so that the sampled perturbations change outputs well above the tolerances
MC = dict(num_samples=3, buffer_size=2, sample_scaler=0.5, kl_loss_weight=1e-2)
CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, lora_dropout=0.1), MC),
    "mlp_entropy": ("mlp", dict(target_modules=["lin1"], r=2, lora_bias=True),
                    {**MC, "use_entropy": True, "dirichlet_prior": 0.5}),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                            lora_alpha=8), {**MC, "num_samples": 2, "buffer_size": 1}),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], r=4, fan_in_fan_out=True), MC),
}


def config(lib, case, **extra):
    _, kw, mc = CASES[case]
    kw = {**kw, **extra}
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    mc_cls = MontecloraConfig if lib is fastpeft else HFMontecloraConfig
    return lib.LoraConfig(**kw, monteclora_config=mc_cls(**mc))


def factory(case):
    return models.MODELS[CASES[case][0]][0]


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, perturb=True):
    """Factories seed torch, so both libraries build (and pre-draw) identically; then the same
    perturbation."""
    model = lib.get_peft_model(factory(case)(), config(lib, case))
    if perturb:
        models.perturb(model, 0, 0.3)
    return model.eval()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


def trainable(model, lib):
    """Trainable tensors and their grads under file keys."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = lib.get_peft_model_state_dict(model, state_dict=named)
    grads = lib.get_peft_model_state_dict(model, state_dict={n: p.grad for n, p in named.items()})
    return params, grads


@pytest.mark.parametrize("case", list(CASES))
def test_init_and_files_match_hf(case, tmp_path):
    fp, hf = build(fastpeft, case, perturb=False), build(peft, case, perturb=False)
    close(models.forward(fp, inputs(case)), models.forward(factory(case)(), inputs(case)), "identity at init")
    fp.save_pretrained(str(tmp_path / "fp"))
    hf.save_pretrained(str(tmp_path / "hf"))
    fp_sd, hf_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("fp", "hf"))
    assert set(fp_sd) == set(hf_sd)
    assert any(k.endswith("lora_monteclora_sampler.gaussian_var_prior") for k in fp_sd)
    for k in hf_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k
    fp_cfg, hf_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fp", "hf"))
    assert fp_cfg["monteclora_config"] == hf_cfg["monteclora_config"]


@pytest.mark.parametrize("case", ["mlp", "mlp_entropy", "llama"])
def test_training_steps_match_hf_under_the_same_seed(case, tmp_path):
    """buffer_size + 2 steps (the pre-drawn numbers run out and are redrawn): outputs, loss, grads,
    updates."""
    hf, fp = build(peft, case), build(fastpeft, case)
    x = inputs(case)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in (hf, fp)]
    eval_out = run(fp, x).detach()
    outs = []
    for step in range(CASES[case][2]["buffer_size"] + 2):
        results = []
        for model, opt in zip((hf, fp), opts):
            model.train()
            torch.manual_seed(100 + step)  # dropout masks and the redraws
            opt.zero_grad()
            out = run(model, x)
            reg = model._get_monteclora_loss()
            (out.pow(2).mean() + reg).backward()
            results.append((out.detach(), reg.detach(), *trainable(model, peft if model is hf else fastpeft)))
        (h_out, h_reg, _, h_g), (f_out, f_reg, _, f_g) = results
        close(f_out, h_out, f"train output, step {step}")
        close(f_reg, h_reg, f"regulariser, step {step}")
        assert set(f_g) == set(h_g) and any("std_prior" in k for k in f_g)
        for k in h_g:
            close(f_g[k], h_g[k], f"grad {k}, step {step}")
        for opt in opts:
            opt.step()
        outs.append(f_out)
    assert (outs[0] - eval_out).abs().max() > 1e-3, "sampling does not change the training output"
    for model, d in ((hf, "hf"), (fp, "fp")):
        model.save_pretrained(str(tmp_path / d))
    fp_sd, hf_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("fp", "hf"))
    assert set(fp_sd) == set(hf_sd)
    for k in hf_sd:
        close(fp_sd[k], hf_sd[k], f"saved {k}")
    assert any(not torch.equal(v, torch.eye(v.shape[0])) for k, v in fp_sd.items() if "gaussian_var" in k)


def _trained(lib, case):
    """A model after one training step (so the saved sampler buffers differ from their initial values)."""
    model = build(lib, case)
    model.train()
    torch.manual_seed(5)
    (run(model, inputs(case)).pow(2).mean() + model._get_monteclora_loss()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    hf = _trained(peft, case)
    expected = models.forward(hf, inputs(case))
    hf.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    assert isinstance(fp.peft_config["default"].monteclora_config, MontecloraConfig)
    close(models.forward(fp, inputs(case)), expected, "eval output of the HF adapter")
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf), fastpeft.get_peft_model_state_dict(fp)
    assert set(hf_sd) == set(fp_sd)
    for k in hf_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    fp = _trained(fastpeft, case)
    expected = models.forward(fp, inputs(case))
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    close(models.forward(hf, inputs(case)), expected, "HF eval output of the fastpeft adapter")
    hf_sd, fp_sd = peft.get_peft_model_state_dict(hf), fastpeft.get_peft_model_state_dict(fp)
    assert set(hf_sd) == set(fp_sd)
    for k in fp_sd:
        assert torch.equal(fp_sd[k], hf_sd[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = _trained(peft, case), _trained(fastpeft, case)
    x = inputs(case)
    expected = models.forward(fp, x)
    models.assert_merge_roundtrip(fp, x, expected, close, safe_merge=True)
    hf_w = dict(hf.merge_and_unload().named_parameters())
    merged = fp.merge_and_unload()
    close(models.forward(merged, x), expected, "merge_and_unload")
    for n, p in merged.named_parameters():
        close(p, hf_w[n], f"merged weight {n}")


def test_regulariser_selection_and_eval_mode_match_hf():
    models_ = {}
    for lib in (peft, fastpeft):
        model = build(lib, "mlp")
        model.add_adapter("other", config(lib, "mlp_entropy"))
        model.train()
        torch.manual_seed(3)
        run(model, inputs("mlp"))
        models_[lib] = model
    hf, fp = models_[peft], models_[fastpeft]
    for names in (None, "default", "other", ["default", "other"], ["missing"]):
        got, want = fp._get_monteclora_loss(names), hf._get_monteclora_loss(names)
        if isinstance(want, float):
            assert got == want == 0.0, names
        else:
            close(got, want, f"regulariser for {names}")
    hf.eval()
    fp.eval()
    assert fp._get_monteclora_loss() == hf._get_monteclora_loss() == 0.0
    plain = fastpeft.get_peft_model(models.make_mlp(), fastpeft.LoraConfig(target_modules=["lin0"]))
    assert plain.base_model._get_monteclora_loss() == 0.0


def test_delete_adapter_drops_its_sampler():
    model = build(fastpeft, "mlp")
    model.add_adapter("other", config(fastpeft, "mlp"))
    layer = model.base_model.model.lin0
    assert set(layer.lora_monteclora_sampler) == {"default", "other"}
    model.delete_adapter("other")
    assert set(layer.lora_monteclora_sampler) == {"default"}
    assert not any(".other" in k for k in model.state_dict())


def test_same_seed_gives_same_draws_and_eval_is_deterministic():
    torch.manual_seed(0)
    a = MontecloraSampler(6, 3, MontecloraConfig(num_samples=2, buffer_size=3))
    torch.manual_seed(0)
    b = MontecloraSampler(6, 3, MontecloraConfig(num_samples=2, buffer_size=3))
    for _ in range(4):  # past a redraw: the draws after it depend on the RNG state at that time
        torch.manual_seed(9)
        na, wa = a()
        torch.manual_seed(9)
        nb, wb = b()
        assert torch.equal(na, nb) and torch.equal(wa, wb)
        assert na.shape == (2, 6, 3) and torch.allclose(wa.sum(), torch.tensor(1.0))
    model = build(fastpeft, "mlp")
    x = inputs("mlp")
    assert torch.equal(models.forward(model, x), models.forward(model, x))


# ---------------------------------------------------------------------------------------------- errors
def test_unsupported_layer_kinds_and_combinations_refused_like_hf():
    bad = [
        (models.make_emb, dict(target_modules=["emb"]), "not supported on embedding"),
        (models.make_conv2d, dict(target_modules=["conv0"]), "not supported on conv"),
        (models.make_mlp, dict(target_modules=["lin0"], use_dora=True), "cannot be combined"),
    ]
    for make, kw, match in bad:
        with pytest.raises(ValueError, match=match):
            fastpeft.get_peft_model(make(), fastpeft.LoraConfig(**kw, monteclora_config=MontecloraConfig()))
        with pytest.raises(ValueError):
            peft.get_peft_model(make(), peft.LoraConfig(**kw, monteclora_config=HFMontecloraConfig()))
    params = fastpeft.LoraConfig(target_modules=[], target_parameters=["lin0.weight"],
                                 monteclora_config=MontecloraConfig())
    with pytest.raises(ValueError, match="target_parameters"):
        fastpeft.get_peft_model(models.make_mlp(), params)


@pytest.mark.parametrize("kw,match", [
    (dict(num_samples=0), "num_samples must be > 0"),
    (dict(dirichlet_prior=0.0), "dirichlet_prior must be > 0"),
    (dict(buffer_size=0), "buffer_size must be a positive integer"),
])
def test_bad_subconfig_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MontecloraConfig(**kw)
    with pytest.raises(ValueError, match=match):
        fastpeft.LoraConfig(monteclora_config=kw)


def test_subconfig_coercion():
    cfg = fastpeft.LoraConfig(monteclora_config={"num_samples": 4})
    assert cfg.monteclora_config == MontecloraConfig(num_samples=4)
    with pytest.raises(TypeError, match="monteclora_config must be a MontecloraConfig"):
        fastpeft.LoraConfig(monteclora_config=True)
    assert MontecloraConfig() == MontecloraConfig(num_samples=8, use_entropy=False, dirichlet_prior=0.1,
                                                  sample_scaler=1e-4, kl_loss_weight=1e-5, buffer_size=150)


def test_subconfig_fields_and_defaults_match_hf():
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(MontecloraConfig)}
    assert ours == {f.name: f.default for f in dataclasses.fields(HFMontecloraConfig)}
