"""QLoRA: LoRA on bitsandbytes 4-bit (nf4 / fp4, double quantisation, float32 / bfloat16 compute) and 8-bit
bases, against HF PEFT on the same quantised tiny Llama (bitsandbytes runs on CPU here).

Adapter files both ways with equal logits, parameter counts, prepare_model_for_kbit_training, training
gradients, merging (bounded error, refusal with the measured error, dense merge, exact unmerge), DoRA and
mixed-adapter batches.
"""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastpeft
from fastpeft.errors import LossyMergeError
from fastpeft.methods.lora import bnb as lora_bnb
from fastpeft.quant import bnb as qbnb
from state_helpers import assert_all_keys_used

import models

# hidden 64: bitsandbytes' CPU kernel repacks 4-bit weights in blocks of 64 input features
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4_dq_bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def load(folder, kind, **kwargs):
    quant = transformers.BitsAndBytesConfig(**QUANT[kind])
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                             device_map="cpu", **kwargs)


def plain_cpu_kernel(model):
    """Keep bitsandbytes' reference 4-bit CPU path: its AVX512-BF16 kernel repacks weights on the first
    inference call (bfloat16 block scales), which HF PEFT's DoRA cannot dequantise (it reads the packed bytes
    as standard)."""
    for module in model.modules():
        if qbnb.bnb_kind(module) == "4bit":
            module.support_avx512bf16_for_cpu = False
    return model


def inputs():
    ids, mask = models._token_inputs(3, 100, batch=3, seq=6)
    return {"input_ids": ids, "attention_mask": mask}


def lora_config(lib, **extra):
    return lib.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, **extra)


def hf_model(folder, kind, seed=0, plain_kernel=False, **extra):
    torch.manual_seed(seed)
    base = plain_cpu_kernel(load(folder, kind)) if plain_kernel else load(folder, kind)
    return peft.get_peft_model(base, lora_config(peft, init_lora_weights=False, **extra))


def perturb_small(model, scale=1e-3, seed=1):
    """B A small, as after a little training (requantising then stays close)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


@torch.no_grad()
def logits(model):
    return model(**inputs()).logits


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def copy_lora(source, target):
    """`source`'s LoRA tensors into `target` (same module tree): every one used, none of target's missing."""
    lora = {k: v for k, v in source.state_dict().items() if "lora_" in k}
    result = target.load_state_dict(lora, strict=False)
    assert_all_keys_used(result, lambda key: "lora_" in key)


# -------------------------------------------------------------------------------------------- files both ways
@pytest.mark.parametrize("kind", list(QUANT))
def test_adapter_files_both_ways_give_equal_logits(base_dir, tmp_path, kind):
    hf = hf_model(base_dir, kind).eval()
    hf.save_pretrained(tmp_path / "hf")
    fp = fastpeft.PeftModel.from_pretrained(load(base_dir, kind), tmp_path / "hf").eval()
    expected = {QUANT[kind].get("load_in_4bit") and "Linear4bit" or "Linear8bitLt"}
    assert {type(m).__name__ for m in fp.modules() if isinstance(m, lora_bnb.QuantLinear)} == expected
    close(logits(fp), logits(hf))

    fp.save_pretrained(tmp_path / "fp")
    hf_files, fp_files = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("hf", "fp"))
    assert hf_files.keys() == fp_files.keys()
    for key in hf_files:
        assert torch.equal(hf_files[key], fp_files[key]), key
    back = peft.PeftModel.from_pretrained(load(base_dir, kind), tmp_path / "fp").eval()
    close(logits(back), logits(fp))


def test_fastpeft_trained_adapter_loads_in_hf(base_dir, tmp_path):
    torch.manual_seed(0)
    fp = fastpeft.get_peft_model(load(base_dir, "nf4"), lora_config(fastpeft, init_lora_weights=False)).eval()
    fp.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(TARGETS)
    hf = peft.PeftModel.from_pretrained(load(base_dir, "nf4"), tmp_path).eval()
    close(logits(fp), logits(hf))


def test_fastpeft_works_without_bitsandbytes():
    code = ("import sys\n"
            "sys.modules['bitsandbytes'] = None  # as if not installed: importing it raises ImportError\n"
            "import torch, fastpeft\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
            "p = fastpeft.get_peft_model(m, fastpeft.LoraConfig(target_modules=['0']))\n"
            "p(torch.ones(1, 4)); p.print_trainable_parameters(); fastpeft.get_model_status(p)\n"
            "fastpeft.prepare_model_for_kbit_training(torch.nn.Linear(2, 2)); p.merge_and_unload()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("kind", ["nf4_dq_bf16", "int8"])
def test_parameter_counts_match_hf_and_full_precision(base_dir, kind, capsys):
    hf = hf_model(base_dir, kind)
    fp = fastpeft.get_peft_model(load(base_dir, kind), lora_config(fastpeft))
    dense = fastpeft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                    lora_config(fastpeft))
    assert fp.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    assert fp.get_nb_trainable_parameters() == dense.get_nb_trainable_parameters()
    status = fastpeft.get_model_status(fp)
    assert (status.trainable_params, status.total_params) == hf.get_nb_trainable_parameters()
    hf.print_trainable_parameters()
    fp.print_trainable_parameters()
    hf_line, fp_line = capsys.readouterr().out.strip().splitlines()
    assert hf_line == fp_line


# ---------------------------------------------------------------------------------------------- training
def _prepared_state(model):
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}, (
        model.is_gradient_checkpointing, hasattr(model, "_require_grads_hook"))


@pytest.mark.parametrize("kwargs", [{}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
                                    {"use_gradient_checkpointing": False}])
def test_prepare_model_for_kbit_training_matches_hf(base_dir, kwargs):
    theirs = peft.prepare_model_for_kbit_training(load(base_dir, "nf4", dtype=torch.bfloat16), **kwargs)
    ours = fastpeft.prepare_model_for_kbit_training(load(base_dir, "nf4", dtype=torch.bfloat16), **kwargs)
    assert _prepared_state(ours) == _prepared_state(theirs)
    norm = ours.model.norm.weight
    assert norm.dtype == torch.float32 and not norm.requires_grad  # layer norms upcast (and frozen)


def _train_step(lib, folder, kind):
    torch.manual_seed(0)
    model = lib.prepare_model_for_kbit_training(load(folder, kind))
    model = lib.get_peft_model(model, lora_config(lib, init_lora_weights=False, lora_dropout=0.0))
    model.train()
    batch = inputs()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return model, loss


@pytest.mark.parametrize("kind", ["nf4_dq_bf16", "int8"])
def test_training_gradients_match_hf(base_dir, kind):
    hf, hf_loss = _train_step(peft, base_dir, kind)
    fp, fp_loss = _train_step(fastpeft, base_dir, kind)
    close(fp_loss, hf_loss)
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    fp_grads = {n: p.grad for n, p in fp.named_parameters() if p.requires_grad}
    assert hf_grads.keys() == fp_grads.keys() and hf_grads
    for name, grad in hf_grads.items():
        close(fp_grads[name], grad, atol=1e-5)


def test_qlora_training_lowers_the_loss(base_dir):
    fp, _ = _train_step(fastpeft, base_dir, "nf4")
    optimizer = torch.optim.AdamW([p for p in fp.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = inputs(), []
    for _ in range(4):
        optimizer.zero_grad()
        loss = fp(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


# ---------------------------------------------------------------------------------------------- merging
def _target_and_achieved(layer, original, original_scales):
    """(what the unmerged layer computes as a dense weight, what the merged weight holds), from bitsandbytes;
    int8: weights times their row scales / 127 (`original_scales`: those of `original`)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.get_base_layer()
    if qbnb.param_kind(original) == "4bit":
        before = bnb.functional.dequantize_4bit(original.data, original.quant_state)
        after = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:
        before, after = (w.data.float() * s.view(-1, 1) / 127 for w, s in (
            (original, original_scales), (base.weight, base.weight.SCB)))
    return before.float() + (b @ a).detach() * layer.scaling["default"], after.float()


# nf4: bounds loosened (a 1e-3 update is mostly rounded away by the 4-bit grid); int8: the default bounds
@pytest.mark.parametrize("kind, scale, bounds", [
    ("nf4", 1e-3, dict(max_merge_error=0.05, max_adapter_loss=1.5)), ("int8", 1e-2, {})])
def test_merge_within_bounds_matches_hf_merge(base_dir, kind, scale, bounds):
    hf = perturb_small(hf_model(base_dir, kind), scale)
    fp = perturb_small(
        fastpeft.get_peft_model(load(base_dir, kind), lora_config(fastpeft, init_lora_weights=False)), scale)
    copy_lora(hf, fp)
    layers = [m for m in fp.modules() if isinstance(m, lora_bnb.QuantLinear)]
    originals = {layer: layer.get_base_layer().weight for layer in layers}  # no forward yet: int8 SCB on them
    scales = {layer: getattr(weight, "SCB", None) for layer, weight in originals.items()}
    merged = fp.merge_and_unload(**bounds)
    for layer in layers:
        target, achieved = _target_and_achieved(layer, originals[layer], scales[layer])
        measured = (achieved - target).norm() / target.norm()
        assert abs(float(measured) - layer.last_merge_error.weight) < 1e-5
        assert layer.last_merge_error.output <= bounds.get("max_merge_error", qbnb.DEFAULT_MAX_MERGE_ERROR)
        assert layer.last_merge_error.adapter <= bounds.get("max_adapter_loss", qbnb.DEFAULT_MAX_ADAPTER_LOSS)
    close(logits(merged), logits(hf.merge_and_unload()))  # HF requantises the same way, silently


def test_lossy_merge_is_refused_with_the_measured_error_and_leaves_the_model_as_it_was(base_dir):
    fp = fastpeft.get_peft_model(load(base_dir, "nf4"), lora_config(fastpeft, init_lora_weights=False)).eval()
    before = logits(fp)
    weights = {n: p.data.clone() for n, p in fp.named_parameters() if "base_layer" in n}
    with pytest.raises(LossyMergeError, match=r"relative output error \d+\.\d+% .*allow_lossy_merge=True"):
        fp.merge_and_unload()
    with pytest.raises(ValueError, match="output error above max_merge_error=2.000%"):
        fp.merge_adapter(max_merge_error=0.02)
    assert not any(m.merged for m in fp.modules() if isinstance(m, lora_bnb.QuantLinear))
    for name, param in fp.named_parameters():
        if name in weights:
            assert torch.equal(param.data, weights[name]), name
    close(logits(fp), before, atol=0)


def test_allowed_lossy_merge_matches_hf_and_unmerge_is_exact(base_dir):
    hf = hf_model(base_dir, "fp4")
    fp = fastpeft.get_peft_model(load(base_dir, "fp4"), lora_config(fastpeft, init_lora_weights=False))
    copy_lora(hf, fp)
    originals = {n: (p.data.clone(), p.quant_state.absmax.clone()) for n, p in fp.named_parameters()
                 if qbnb.param_kind(p) == "4bit" and "base_layer" in n}
    fp.merge_adapter(allow_lossy_merge=True)
    hf.merge_adapter()
    close(logits(fp.eval()), logits(hf.eval()))
    errors = [m.last_merge_error for m in fp.modules() if isinstance(m, lora_bnb.QuantLinear)]
    assert all(e.output > qbnb.DEFAULT_MAX_MERGE_ERROR for e in errors)
    fp.unmerge_adapter()
    for name, param in fp.named_parameters():
        if name in originals:
            data, absmax = originals[name]
            assert torch.equal(param.data, data) and torch.equal(param.quant_state.absmax, absmax), name
    with qbnb.merge_policy(allow_lossy=True):  # an enclosing policy applies to LoRA too (quant/merge.py)
        fp.merge_adapter()
    close(logits(fp), logits(hf))


def test_update_rounded_away_is_refused_although_the_output_error_is_small(base_dir):
    fp = perturb_small(
        fastpeft.get_peft_model(load(base_dir, "nf4"), lora_config(fastpeft, init_lora_weights=False)), 1e-4)
    with pytest.raises(LossyMergeError,
                       match=r"\d+\.\d% of the adapter's own contribution.*max_adapter_loss=50%"):
        fp.merge_adapter()
    fp.merge_adapter(max_adapter_loss=2.0)  # outputs barely move: within max_merge_error
    errors = [m.last_merge_error for m in fp.modules() if isinstance(m, lora_bnb.QuantLinear)]
    assert all(e.output < qbnb.DEFAULT_MAX_MERGE_ERROR and e.adapter > 0.9 for e in errors)


def test_refusal_in_a_later_layer_takes_back_the_earlier_merges(base_dir):
    fp = perturb_small(fastpeft.get_peft_model(load(base_dir, "nf4"),
                                               lora_config(fastpeft, init_lora_weights=False))).eval()
    last = fp.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        last.lora_B["default"].weight.normal_(0, 1.0)  # only this layer's merge is too lossy
    before, weights = logits(fp), {m: m.get_base_layer().weight for m in fp.modules()
                                   if isinstance(m, lora_bnb.QuantLinear)}
    with pytest.raises(LossyMergeError, match="layers.1.mlp.down_proj"):
        fp.merge_and_unload(max_merge_error=0.05, max_adapter_loss=2.0)
    assert [m.last_merge_error is not None for m in weights][:2] == [True, True]  # earlier layers did merge
    for layer, weight in weights.items():
        assert not layer.merged and layer.get_base_layer().weight is weight
    close(logits(fp), before, atol=0)


def test_int8_merge_then_unmerge_restores_exactly(base_dir):
    fp = perturb_small(fastpeft.get_peft_model(load(base_dir, "int8"),
                                               lora_config(fastpeft, init_lora_weights=False)), 3e-2).eval()
    before = logits(fp)
    with fp.disable_adapter():
        assert (before - logits(fp)).abs().max() > 0.15  # the adapter's effect (measured 0.198)
    fp.merge_adapter()
    merged = logits(fp)
    assert (merged - before).abs().max() > 0  # requantised weights differ slightly
    close(merged, before, atol=1.2e-2)  # int8 requantisation and activation rounding: measured 5.8e-3
    fp.unmerge_adapter()
    close(logits(fp), before, atol=0)


@pytest.mark.parametrize("kind", ["nf4_dq_bf16", "int8"])
def test_dequantized_merge_gives_dense_layers_with_the_adapter_outputs(base_dir, tmp_path, kind):
    fp = fastpeft.get_peft_model(load(base_dir, kind), lora_config(fastpeft, init_lora_weights=False)).eval()
    expected = logits(fp)
    with fp.disable_adapter():
        assert (expected - logits(fp)).abs().max() > 0.5  # the adapter's effect (measured 0.8)
    q_proj = fp.base_model.model.model.layers[0].self_attn.q_proj
    a, b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
    dense_q = (qbnb.dequantize_weight(q_proj.get_base_layer()).float()
               + (b @ a).detach() * q_proj.scaling["default"])
    merged = fp.merge_and_unload(dequantize=True)
    close(merged.model.layers[0].self_attn.q_proj.weight.float(), dense_q, atol=1e-6)
    assert not [n for n, m in merged.named_modules() if qbnb.bnb_kind(m)]
    assert not getattr(merged, "is_loaded_in_4bit", False) and not getattr(merged, "is_loaded_in_8bit", False)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # bf16 compute / int8 activations in the quantised forward: measured errors 1.9e-3 / 3.4e-3
    close(logits(merged), expected, atol=5e-3 if kind == "nf4_dq_bf16" else 1e-2)
    merged.save_pretrained(tmp_path)  # an ordinary full-precision checkpoint now
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    close(logits(reloaded), logits(merged), atol=1e-6)


# ---------------------------------------------------------------------------------------- DoRA, mixed batches
def test_dora_on_4bit_matches_hf_both_ways(base_dir, tmp_path):
    hf = perturb_small(hf_model(base_dir, "nf4", plain_kernel=True, use_dora=True), scale=0.05).eval()
    hf.save_pretrained(tmp_path / "hf")
    fp = fastpeft.PeftModel.from_pretrained(plain_cpu_kernel(load(base_dir, "nf4")), tmp_path / "hf").eval()
    close(logits(fp), logits(hf))
    fp.save_pretrained(tmp_path / "fp")
    assert load_file(tmp_path / "fp" / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "hf" / "adapter_model.safetensors").keys()
    back = peft.PeftModel.from_pretrained(plain_cpu_kernel(load(base_dir, "nf4")), tmp_path / "fp").eval()
    close(logits(back), logits(fp))
    dense = fp.merge_and_unload(dequantize=True)
    close(logits(dense), logits(hf), atol=1e-4)


def test_fresh_dora_on_4bit_is_identity_and_matches_hf_magnitudes(base_dir):
    expected = logits(plain_cpu_kernel(load(base_dir, "nf4")).eval())
    fresh = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        base = plain_cpu_kernel(load(base_dir, "nf4"))
        fresh[lib] = lib.get_peft_model(base, lora_config(lib, use_dora=True)).eval()
    hf_state = peft.get_peft_model_state_dict(fresh[peft])
    fp_state = fastpeft.get_peft_model_state_dict(fresh[fastpeft])
    assert hf_state.keys() == fp_state.keys()
    magnitudes = [k for k in fp_state if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 6
    for key in magnitudes:
        close(fp_state[key], hf_state[key], atol=1e-6)
    close(logits(fresh[fastpeft]), expected, atol=1e-5)


def test_mixed_adapter_batch_on_4bit_matches_hf(base_dir):
    def two_adapters(lib, model):
        torch.manual_seed(0)
        model = lib.get_peft_model(model, lora_config(lib, init_lora_weights=False), adapter_name="a")
        model.add_adapter("b", lora_config(lib, init_lora_weights=False))
        return model.eval()

    hf = two_adapters(peft, load(base_dir, "nf4"))
    fp = two_adapters(fastpeft, load(base_dir, "nf4"))
    copy_lora(hf, fp)
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        close(fp(**inputs(), adapter_names=names).logits, hf(**inputs(), adapter_names=names).logits)


def test_alora_on_4bit_matches_hf_and_refuses_merging(base_dir):
    ids = torch.tensor([[11, 12, 5, 6, 17, 18], [5, 6, 21, 22, 23, 24], [31, 32, 33, 34, 35, 36]])

    def build(lib):
        torch.manual_seed(0)
        config = lib.LoraConfig(task_type=lib.TaskType.CAUSAL_LM, target_modules=TARGETS, r=4, lora_alpha=8,
                                alora_invocation_tokens=[5, 6], init_lora_weights=False)
        return lib.get_peft_model(load(base_dir, "nf4"), config).eval()

    hf, fp = build(peft), build(fastpeft)
    with torch.no_grad():
        close(fp(input_ids=ids).logits, hf(input_ids=ids).logits)
    with pytest.raises(NotImplementedError, match="aLoRA adapter"):
        fp.merge_and_unload(allow_lossy_merge=True)


def test_bad_merge_bound_is_refused(base_dir):
    fp = fastpeft.get_peft_model(load(base_dir, "int8"), lora_config(fastpeft))
    with pytest.raises(ValueError, match="max_merge_error must be a non-negative"):
        fp.merge_and_unload(max_merge_error=-1)
