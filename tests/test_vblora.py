"""VB-LoRA against HF PEFT 0.21.2: seeded init, the shared vector bank's file key, full and top-k-only files both
ways, outputs, gradients, merging, several adapters, mixed batches, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import models

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.methods.vblora import VBLoRAConfig, VBLoRAModel  # noqa: E402

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=2, vector_length=10, num_vectors=16)),
    "mlp_topk": ("mlp", dict(target_modules=["lin0", "lin1"], r=3, vector_length=5, num_vectors=12, topk=3,
                             save_only_topk_weights=True, bias="vblora_only")),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], r=2, vector_length=2, num_vectors=8,
                                        init_vector_bank_bound=0.5, init_logits_std=1.0)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=4, vector_length=8, num_vectors=12)),
    "gpt2_topk_int16": ("gpt2", dict(task_type="CAUSAL_LM", r=2, vector_length=16, num_vectors=300,
                                     save_only_topk_weights=True)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=2, vector_length=8, num_vectors=10, bias="all")),
    "t5": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=2, vector_length=8, num_vectors=10, vblora_dropout=0.1)),
}


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    return (peft.VBLoRAConfig if lib is peft else VBLoRAConfig)(**kw)


def factory(case):
    return models.MODELS[CASES[case][0]][0]


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def build(lib, case, seed=0, **extra):
    """A VB-LoRA model of `lib` (the global RNG in the same state for both libraries), trainables perturbed."""
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


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_seeded_init_matches_hf(case):
    """Same seeds: the same bank and logits (the bank drawn as HF draws it), the same trainable names."""
    base = factory(case)()
    torch.manual_seed(7)
    hf = peft.get_peft_model(base, config(peft, case))
    base = factory(case)()
    torch.manual_seed(7)
    fp = fastpeft.get_peft_model(base, config(fastpeft, case))
    hf_sd, fp_sd = hf.state_dict(), fp.state_dict()
    assert set(hf_sd) == set(fp_sd) and "base_model.vblora_vector_bank.default" in fp_sd
    for key in hf_sd:
        assert torch.equal(hf_sd[key], fp_sd[key]), key
    trainable = [[n for n, p in m.named_parameters() if p.requires_grad] for m in (hf, fp)]
    assert trainable[0] == trainable[1]
    assert hf.get_nb_trainable_parameters() == fp.get_nb_trainable_parameters()
    bank = fp.base_model.vblora_vector_bank["default"]
    assert all(m.vblora_vector_bank["default"] is bank for m in fp.modules() if hasattr(m, "vblora_logits_A"))


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """Both libraries save the same file (bank once, full or top-k logits); each loads the other's file."""
    hf, fp = build(peft, case), build(fastpeft, case)
    x = inputs(case)
    hf_out = models.forward(hf, x)
    differs(hf_out, models.forward(factory(case)(), x))
    close(models.forward(fp, x), hf_out, "fastpeft vs HF")
    hf.save_pretrained(str(tmp_path / "hf"))
    fp.save_pretrained(str(tmp_path / "fp"))
    hf_sd = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    fp_sd = load_file(str(tmp_path / "fp" / "adapter_model.safetensors"))
    assert set(fp_sd) == set(hf_sd) and "base_model.vblora_vector_bank" in hf_sd
    for key in hf_sd:
        assert fp_sd[key].dtype == hf_sd[key].dtype and torch.equal(fp_sd[key], hf_sd[key]), key
    assert _json(tmp_path / "fp") == _json(tmp_path / "hf")
    loaded_fp = fastpeft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "hf")).eval()
    close(models.forward(loaded_fp, x), hf_out, "fastpeft(HF adapter) vs HF")
    loaded_hf = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path / "fp")).eval()
    close(models.forward(loaded_hf, x), hf_out, "HF(fastpeft adapter) vs HF")
    hf_logits = {k: v for k, v in loaded_hf.state_dict().items() if "vblora_" in k}
    fp_logits = loaded_fp.state_dict()
    for key, value in hf_logits.items():  # the same -inf pattern and log-weights after a top-k load
        close(fp_logits[key], value, f"loaded {key}")


def test_topk_loaded_adapter_refuses_training_like_hf(tmp_path):
    build(fastpeft, "mlp_topk").save_pretrained(str(tmp_path))
    x = inputs("mlp_topk")
    hf = peft.PeftModel.from_pretrained(factory("mlp_topk")(), str(tmp_path), is_trainable=True).train()
    fp = fastpeft.PeftModel.from_pretrained(factory("mlp_topk")(), str(tmp_path), is_trainable=True).train()
    with pytest.raises(RuntimeError):
        hf(x)
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        fp(x)


@pytest.mark.parametrize("case", ["mlp", "mlp_topk", "gpt2_topk_int16"])
def test_savable_parameter_counts_match_hf(case):
    hf, fp = build(peft, case), build(fastpeft, case)
    assert fp.base_model.get_nb_savable_parameters() == hf.base_model.get_nb_savable_parameters()


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "bert"])
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
    assert set(fp_g) == set(hf_g) and any("vblora_vector_bank" in k for k in hf_g)
    for key in hf_g:
        close(fp_g[key], hf_g[key], f"grad {key}", atol=1e-5)
    assert max(g.abs().max().item() for g in fp_g.values()) > 1e-5


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case, bias="none"))
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


def test_two_banks_disable_set_delete_and_mixed_batch_match_hf(tmp_path):
    hf, fp = _two_adapters(peft, "llama"), _two_adapters(fastpeft, "llama")
    x = inputs("llama")
    base = models.forward(factory("llama")(), x)
    assert set(fp.base_model.vblora_vector_bank) == {"default", "other"}
    with fp.disable_adapter():
        close(models.forward(fp, x), base, "disabled")
    for name in ("other", "default"):
        hf.set_adapter(name)
        fp.set_adapter(name)
        close(models.forward(fp, x), models.forward(hf, x), f"adapter {name}")
    fp.save_pretrained(str(tmp_path))
    other = load_file(str(tmp_path / "other" / "adapter_model.safetensors"))
    close(other["base_model.vblora_vector_bank"], hf.base_model.vblora_vector_bank["other"], "other's bank")
    mixed = models.forward(fp, {**x, "adapter_names": ["other", "__base__"]})
    hf.set_adapter("other")
    close(mixed[:1], models.forward(hf, {k: v[:1] for k, v in x.items()}), "row 0 (other)")
    close(mixed[1:], base[1:], "row 1 (base)")
    hf.delete_adapter("other")
    fp.delete_adapter("other")
    assert set(fp.base_model.vblora_vector_bank) == {"default"}
    assert not any(".other" in k for k in fp.state_dict())
    close(models.forward(fp, x), models.forward(hf, x), "after delete")


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="in_features=10 .* not divisible by vector_length=4"):
        fastpeft.get_peft_model(models.make_mlp(), VBLoRAConfig(target_modules=["lin0"], vector_length=4))
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), VBLoRAConfig(target_modules=["emb"], vector_length=2))
    with pytest.raises(ValueError, match="topk=5 exceeds num_vectors=4"):
        VBLoRAConfig(topk=5, num_vectors=4)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        VBLoRAConfig(r=0)
    model = fastpeft.get_peft_model(models.make_mlp(), VBLoRAConfig(target_modules=["lin1"], vector_length=4))
    assert isinstance(model.base_model, VBLoRAModel)
    with pytest.raises(ValueError, match="not divisible"):  # a failed second adapter leaves no bank behind
        model.add_adapter("bad", VBLoRAConfig(target_modules=["lin0", "lin1"], vector_length=4))
    assert set(model.base_model.vblora_vector_bank) == {"default"}


def test_topk_file_problems(tmp_path):
    """A top-k file missing a tensor is refused by name; whole logits under a top-k config load as in HF PEFT."""
    from safetensors.torch import save_file

    build(fastpeft, "mlp_topk").save_pretrained(str(tmp_path / "topk"))
    weights = load_file(str(tmp_path / "topk" / "adapter_model.safetensors"))
    key = "base_model.model.lin1.vblora_logits_B_topk_weights"
    save_file({k: v for k, v in weights.items() if k != key}, str(tmp_path / "topk" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lacks.*lin1.vblora_logits_B_topk_weights"):
        fastpeft.PeftModel.from_pretrained(factory("mlp_topk")(), str(tmp_path / "topk"))
    build(peft, "mlp_topk", save_only_topk_weights=False).save_pretrained(str(tmp_path / "full"))
    cfg_path = tmp_path / "full" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"save_only_topk_weights": false',
                                                     '"save_only_topk_weights": true'))
    x = inputs("mlp_topk")
    hf = peft.PeftModel.from_pretrained(factory("mlp_topk")(), str(tmp_path / "full")).eval()
    fp = fastpeft.PeftModel.from_pretrained(factory("mlp_topk")(), str(tmp_path / "full")).eval()
    close(models.forward(fp, x), models.forward(hf, x), "whole logits under a top-k config")
    close(models.forward(fp, x), models.forward(build(peft, "mlp_topk"), x), "as before saving")
