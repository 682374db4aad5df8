"""Arrow routing (`arrow_config`, `create_arrow_model`) over a bitsandbytes 4-bit tiny Llama (hidden 64, NF4
with float32 compute, real bitsandbytes on the CPU) against HF PEFT 0.21.2, which routes LoRA experts on
`Linear4bit` layers as on dense ones: routed outputs, GenKnowSub, mixed batches, saved Arrow models both ways,
merging the router refused, and LLM.int8() layers."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
import quantised_models as qm
from fastpeft.methods.lora import bnb as lora_bnb
from fastpeft.methods.lora.variants import arrow

from oracle_helpers import save_random_adapters

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
ARROW_CONFIG = {peft: peft.ArrowConfig, fastpeft: arrow.ArrowConfig}
CREATE = {peft: peft.create_arrow_model, fastpeft: arrow.create_arrow_model}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return qm.save_llama(tmp_path_factory.mktemp("llama64"))


def save_experts(lib, folder, n, seed=0):
    """`n` LoRA adapters of `lib` on the float tiny Llama with random (seeded) A and B; returns their
    folders."""
    def config():
        return lib.LoraConfig(task_type=lib.TaskType.CAUSAL_LM, target_modules=TARGETS, r=4, lora_alpha=16,
                              init_lora_weights=False)

    return save_random_adapters(lib, qm.make_llama, config, folder, n, seed)


def build(lib, folder, tasks, general=None, bits=4, **kw):
    config = ARROW_CONFIG[lib](**{"top_k": 2, "rng_seed": 0, "use_gks": general is not None, **kw})
    extra = {"general_adapter_paths": general} if general is not None else {}
    return CREATE[lib](qm.load_quantised(folder, bits), tasks, config, **extra)


def lora_state(model, name):
    return {k: v for k, v in model.state_dict().items() if f".{name}." in k}


@pytest.mark.parametrize(("saver", "gks"), [("peft", False), ("fastpeft", False), ("peft", True)])
def test_outputs_match_hf_on_4bit(llama_folder, tmp_path, saver, gks):
    """Experts saved by either library -> both build the Arrow model on the 4-bit base -> same logits (and the
    same experts after GenKnowSub)."""
    lib = peft if saver == "peft" else fastpeft
    tasks = save_experts(lib, tmp_path, 3)
    general = save_experts(lib, tmp_path, 2, seed=10) if gks else None
    ours, theirs = build(fastpeft, llama_folder, tasks, general), build(peft, llama_folder, tasks, general)
    assert any(isinstance(m, lora_bnb.Linear4bit) for m in ours.modules())
    expected = qm.logits(theirs)
    assert (expected - qm.logits(qm.load_quantised(llama_folder, 4))).abs().max() > 1e-2  # the experts act
    torch.testing.assert_close(qm.logits(ours), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(qm.logits(ours), expected, atol=ATOL, rtol=0)  # GenKnowSub ran once only
    for name in ("task_0", "task_2"):
        mine, hf = lora_state(ours, name), lora_state(theirs, name)
        assert mine.keys() == hf.keys() and mine
        for key in mine:
            torch.testing.assert_close(mine[key], hf[key], atol=1e-6, rtol=0)


def test_mixed_batch_matches_hf_on_4bit(llama_folder, tmp_path):
    """adapter_names per row (the router, one expert alone) through the 4-bit layers, as in HF PEFT."""
    tasks = save_experts(peft, tmp_path, 3)
    batch = {**qm.inputs(), "adapter_names": ["arrow_router", "task_1"]}
    got = [qm.logits(build(lib, llama_folder, tasks), batch) for lib in (fastpeft, peft)]
    torch.testing.assert_close(got[0], got[1], atol=ATOL, rtol=0)


def test_saved_arrow_models_match_and_reload_both_ways(llama_folder, tmp_path):
    """Both save the same adapter files from the 4-bit Arrow model (experts after GenKnowSub, the router's B);
    each library rebuilds the other's saved experts on the 4-bit base with the same outputs."""
    tasks, general = save_experts(peft, tmp_path, 3), save_experts(fastpeft, tmp_path, 2, seed=10)
    ours, theirs = build(fastpeft, llama_folder, tasks, general), build(peft, llama_folder, tasks, general)
    expected = qm.logits(theirs)
    qm.logits(ours)  # GenKnowSub runs on the first forward in both
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for name in ("arrow_router", "task_0", "task_1", "task_2", "gks_0", "gks_1"):
        mine = load_file(tmp_path / "ours" / name / "adapter_model.safetensors")
        hf = load_file(tmp_path / "theirs" / name / "adapter_model.safetensors")
        assert mine.keys() == hf.keys() and mine
        for key in mine:
            if name == "arrow_router" and "lora_A" in key:  # the router's own A: random, never used
                assert mine[key].shape == hf[key].shape
            else:
                torch.testing.assert_close(mine[key], hf[key], atol=1e-6, rtol=0)
    for lib, folder in ((fastpeft, tmp_path / "theirs"), (peft, tmp_path / "ours")):
        saved = [str(folder / f"task_{i}") for i in range(3)]
        torch.testing.assert_close(qm.logits(build(lib, llama_folder, saved)), expected, atol=ATOL, rtol=0)


def test_merging_router_refused_like_hf(llama_folder, tmp_path):
    """Merging the router into the 4-bit weights: both refuse (no single weight stands for per-token
    routing)."""
    tasks = save_experts(peft, tmp_path, 2)
    with pytest.raises(RuntimeError):
        build(peft, llama_folder, tasks).merge_and_unload()
    ours = build(fastpeft, llama_folder, tasks)
    before = {k: v.clone() for k, v in ours.state_dict().items() if ".base_layer.weight" in k}
    with pytest.raises(RuntimeError, match="Cannot merge the Arrow router 'arrow_router'"):
        ours.merge_and_unload()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())  # nothing was merged


def test_8bit_outputs_match_hf(llama_folder, tmp_path):
    """bitsandbytes' Linear8bitLt is an nn.Linear, so both libraries route experts over LLM.int8() layers
    too."""
    tasks = save_experts(peft, tmp_path, 3)
    ours, theirs = build(fastpeft, llama_folder, tasks, bits=8), build(peft, llama_folder, tasks, bits=8)
    assert any(isinstance(m, lora_bnb.Linear8bitLt) for m in ours.modules())
    torch.testing.assert_close(qm.logits(ours), qm.logits(theirs), atol=ATOL, rtol=0)
