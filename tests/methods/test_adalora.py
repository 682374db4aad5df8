"""AdaLoRA against HF PEFT: outputs, losses (orthogonality regulariser), rank allocation (masks and
rank_pattern step by step under identical training), pruned adapter files both ways, merging, the schedule
guard and callback."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.adalora import AdaLoraCallback, AdaLoraConfig, AdaLoraModel

import models
from oracle_helpers import assert_merges_like_hf, assert_same_files

ATOL = 1e-5
SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=6, deltaT=1)
CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], lora_alpha=8)),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "conv1"], lora_alpha=4)),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"],
                            lora_alpha=16)),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", lora_alpha=8)),
}


def config(lib, case, **extra):
    kw = {**SCHEDULE, **copy.deepcopy(CASES[case][1]), **extra}
    return lib.AdaLoraConfig(**kw) if lib is peft else AdaLoraConfig(**kw)


def build(lib, case, seed=0, **extra):
    """AdaLoRA model of `lib` on the case's base model; every trainable tensor perturbed (same names in
    both)."""
    factory, _ = models.MODELS[CASES[case][0]]
    model = lib.get_peft_model(factory(), config(lib, case, **extra))
    return models.perturb(model, seed, 0.2)


def pair(case, **extra):
    """(HF model, fastpeft model) with the same base and adapter weights (HF's init copied over, then
    perturbed)."""
    hf, fp = build(peft, case, **extra), build(fastpeft, case, **extra)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in fp.named_parameters():
            p.copy_(theirs[name])
    return hf, fp


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def loss_of(model, case):
    x = inputs(case)
    if isinstance(x, dict):
        return model(**x, labels=x["input_ids"]).loss  # includes the orthogonality regulariser
    return model(x).pow(2).mean()


def train(model, case, steps, lr=0.5):
    """Identical SGD steps with update_and_allocate after optimizer.step() (HF PEFT's documented order)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for step in range(steps):
        loss = loss_of(model, case)
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        history.append((loss.detach(), copy.deepcopy(model.peft_config["default"].rank_pattern)))
        opt.zero_grad()
    return history


def e_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_E." in n}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_loss_equal_hf(case):
    hf, fp = pair(case)
    assert sorted(n for n, _ in hf.named_parameters()) == sorted(n for n, _ in fp.named_parameters())
    hf.eval(), fp.eval()
    close(models.forward(fp, inputs(case)), models.forward(hf, inputs(case)), "output")
    if CASES[case][0] in ("llama", "gpt2"):
        close(loss_of(fp, case), loss_of(hf, case), "loss with orth_reg")


@pytest.mark.parametrize("case", ["mlp", "conv2d", "llama", "gpt2_conv1d"])
def test_allocation_masks_and_rank_pattern_equal_hf(case):
    hf, fp = pair(case)
    steps = SCHEDULE["total_step"]
    for step, ((l_hf, p_hf), (l_fp, p_fp)) in enumerate(zip(train(hf, case, steps), train(fp, case, steps))):
        close(l_fp, l_hf, f"loss at step {step}")
        assert p_fp == p_hf, f"rank_pattern differs at step {step}"
    final = hf.peft_config["default"].rank_pattern
    assert sum(sum(flags) for flags in final.values()) == SCHEDULE["target_r"] * len(final)
    e_hf, e_fp = e_values(hf), e_values(fp)
    for name in e_hf:
        assert torch.equal(e_fp[name] == 0, e_hf[name] == 0), f"mask of {name}"
        close(e_fp[name], e_hf[name], name)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_pruned_files_both_ways(case, tmp_path):
    hf, fp = pair(case)
    train(hf, case, 3), train(fp, case, 3)  # stops inside the budget phase (masked at step 2)
    hf.eval(), fp.eval()
    hf.save_pretrained(tmp_path / "hf")
    fp.save_pretrained(tmp_path / "fp")
    assert_same_files(tmp_path / "fp", tmp_path / "hf", exact=False)
    f_hf = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    assert not any("ranknum" in k for k in f_hf)
    assert any(t.shape[0] < SCHEDULE["init_r"] for k, t in f_hf.items() if k.endswith("lora_E")), (
        "nothing pruned")
    assert json.loads((tmp_path / "fp" / "adapter_config.json").read_text())["rank_pattern"]
    expected = models.forward(hf, inputs(case))
    factory = models.MODELS[CASES[case][0]][0]
    for lib, folder in ((fastpeft, "hf"), (peft, "fp"), (fastpeft, "fp")):
        loaded = lib.PeftModel.from_pretrained(factory(), tmp_path / folder)
        close(models.forward(loaded, inputs(case)), expected, f"{lib.__name__} loading {folder}")
    loaded = fastpeft.PeftModel.from_pretrained(factory(), tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(factory(), tmp_path / "hf")
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    # resized like HF, ranknum kept
    assert {n: tuple(p.shape) for n, p in loaded.named_parameters()} == shapes
    for (n, p), (_, q) in zip(sorted(loaded.named_parameters()), sorted(ref.named_parameters())):
        close(p, q, n)
    trainable = fastpeft.PeftModel.from_pretrained(factory(), tmp_path / "hf", is_trainable=True)
    trainable.base_model.update_and_allocate(SCHEDULE["total_step"])  # final phase on a shrunk adapter: no-op
    close(models.forward(trainable.eval(), inputs(case)), expected, "final-phase mask of a loaded adapter")
    loaded.save_pretrained(tmp_path / "again")  # already-pruned layers save as they are
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in again.items()} == {k: tuple(v.shape) for k, v in f_hf.items()}


@pytest.mark.parametrize("case, extra", [("gpt2", {}), ("mlp", {"bias": "lora_only"})])
def test_unpruned_files_both_ways(case, extra, tmp_path):
    hf, fp = pair(case, **extra)
    hf.eval(), fp.eval()
    expected = models.forward(hf, inputs(case))
    hf.save_pretrained(tmp_path / "hf")
    fp.save_pretrained(tmp_path / "fp")
    assert_same_files(tmp_path / "fp", tmp_path / "hf", exact=False)
    factory = models.MODELS[CASES[case][0]][0]
    for lib, folder in ((fastpeft, "hf"), (peft, "fp")):
        close(models.forward(lib.PeftModel.from_pretrained(factory(), tmp_path / folder), inputs(case)),
              expected, f"{lib.__name__} loading {folder}")


@pytest.mark.parametrize("case", ["mlp", "conv2d", "gpt2_conv1d", "llama"])
def test_merge_unmerge_unload_equal_hf(case):
    hf, fp = pair(case)
    hf.eval(), fp.eval()
    models.assert_merge_roundtrip(fp, inputs(case), models.forward(hf, inputs(case)), close)  # plain merge
    assert_merges_like_hf(fp, hf, inputs(case), close, safe_merge=True)


def test_disable_and_second_adapter():
    hf, fp = pair("mlp")
    x = inputs("mlp")
    base = models.forward(models.make_mlp(), x)
    with fp.disable_adapter():
        close(models.forward(fp, x), base, "disabled")
    with pytest.raises(ValueError, match="inference_mode=True"):
        fp.add_adapter("other", config(fastpeft, "mlp"))
    with pytest.raises(ValueError):
        hf.add_adapter("other", config(peft, "mlp"))
    for model, lib in ((hf, peft), (fp, fastpeft)):
        model.add_adapter("other", config(lib, "mlp", inference_mode=True, init_lora_weights=False, init_r=3))
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if ".other" in name and "ranknum" not in name:
                    p.copy_(torch.linspace(-0.3, 0.3, p.numel()).view(p.shape))
        model.set_adapter("other")
    close(models.forward(fp, x), models.forward(hf, x), "second adapter")
    x3 = torch.cat([x, x[:1]])
    mixed = fp(x3, adapter_names=["default", "other", "__base__", "other"]).detach()
    close(mixed[1], models.forward(fp, x)[1], "mixed batch row of 'other'")
    fp.set_adapter("default")
    close(mixed[0], models.forward(fp, x)[0], "mixed batch row of 'default'")
    close(mixed[2], base[2], "mixed batch base row")
    fp.delete_adapter("other")
    fp.set_adapter("default")
    close(models.forward(fp, x), (hf.set_adapter("default"), models.forward(hf, x))[1], "after delete")


def test_config_roundtrip_and_bad_input(tmp_path):
    kw = dict(target_modules=["lin0"], init_r=4, target_r=2, total_step=10, tinit=2, beta1=0.9,
              orth_reg_weight=0.1)
    peft.AdaLoraConfig(**kw).save_pretrained(tmp_path / "hf")
    fp = fastpeft.PeftConfig.from_pretrained(tmp_path / "hf")
    assert isinstance(fp, AdaLoraConfig) and fp.beta1 == 0.9 and fp.tinit == 2
    fp.save_pretrained(tmp_path / "fp")
    back = peft.PeftConfig.from_pretrained(tmp_path / "fp")
    assert back.to_dict() == peft.AdaLoraConfig(**kw).to_dict()
    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(target_modules=["lin0"])
    with pytest.raises(ValueError, match="tinit"):
        AdaLoraConfig(target_modules=["lin0"], total_step=10, tinit=8, tfinal=2)
    with pytest.raises(ValueError, match="use_dora"):
        AdaLoraConfig(target_modules=["lin0"], total_step=10, use_dora=True)
    with pytest.raises(ValueError, match="groups=1"):
        fastpeft.get_peft_model(models.make_conv2d(), AdaLoraConfig(target_modules=["gconv"], total_step=10))
    with pytest.raises(ValueError, match="Embedding"):
        fastpeft.get_peft_model(models.make_emb(), AdaLoraConfig(target_modules=["emb"], total_step=10))


def test_forgotten_schedule_is_refused_and_accumulation_is_one_step():
    model = build(fastpeft, "mlp", tinit=2)
    model.train()
    for _ in range(3):  # steps 0..tinit; the second micro-batch of each step does not count
        for _ in range(2):
            loss_of(model, "mlp").backward()
        model.zero_grad()
    with pytest.raises(RuntimeError, match="update_and_allocate.*AdaLoraCallback"):
        loss_of(model, "mlp")
    ok = build(fastpeft, "mlp", tinit=0)
    train(ok, "mlp", 3)  # called every step: no error
    assert isinstance(ok.base_model, AdaLoraModel)


def test_trainer_callback_runs_schedule(tmp_path):
    import transformers
    x = inputs("llama")
    rows = [{"input_ids": x["input_ids"][i], "labels": x["input_ids"][i]}
            for i in range(x["input_ids"].shape[0])]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                          learning_rate=0.05, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    model = build(fastpeft, "llama", tinit=0, tfinal=1, total_step=3)
    steps = []
    allocate = model.base_model.update_and_allocate
    model.base_model.update_and_allocate = lambda step: (steps.append(step), allocate(step))
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[AdaLoraCallback()]).train()
    assert steps == list(range(3))  # once per optimizer step (not per micro-batch), 0-based like HF's loops
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(flags) for flags in pattern.values()) == SCHEDULE["target_r"] * len(pattern)
    with pytest.raises(ValueError, match="no AdaLoRA adapter"):
        AdaLoraCallback().on_train_begin(args, None, None, model=models.make_mlp())
