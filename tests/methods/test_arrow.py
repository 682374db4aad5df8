"""Arrow (`arrow_config`, `create_arrow_model`) against HF PEFT: routed outputs with and without GenKnowSub,
expert files both ways, saved Arrow models both ways, experts added later, and the configs both refuse."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.lora.variants import arrow

import models
from oracle_helpers import save_random_adapters

ATOL = 1e-5
ARROW_CONFIG = {peft: peft.ArrowConfig, fastpeft: arrow.ArrowConfig}  # fastpeft's export: the lead's call
CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                            lora_alpha=16)),
}


def base(case):
    return models.MODELS[CASES[case][0]][0]()


def inputs(case):
    return models.MODELS[CASES[case][0]][1]()


def lora_config(lib, case, **extra):
    kw = {**CASES[case][1], "init_lora_weights": False, **extra}
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    return lib.LoraConfig(**kw)


def save_experts(lib, case, folder, n, seed=0, **extra):
    """Save `n` LoRA adapters of `lib` with random (seeded) A and B; returns their folders."""
    return save_random_adapters(lib, lambda: base(case), lambda: lora_config(lib, case, **extra),
                                folder, n, seed)


def arrow_config(lib, **kw):
    return ARROW_CONFIG[lib](**{"top_k": 2, "rng_seed": 0, **kw})


def build(lib, case, tasks, general=None, **kw):
    cfg = arrow_config(lib, use_gks=general is not None, **kw)
    create = peft.create_arrow_model if lib is peft else arrow.create_arrow_model
    extra = {"general_adapter_paths": general} if general is not None else {}
    return create(base(case), tasks, cfg, **extra)


def out(model, case):
    return models.forward(model, inputs(case))


def lora_state(model, name):
    return {k: v for k, v in model.state_dict().items() if f".{name}." in k}


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize(("case", "gks", "saver"), [
    ("mlp", False, "peft"), ("mlp", True, "peft"), ("mlp", False, "fastpeft"), ("mlp", True, "fastpeft"),
    ("llama", False, "peft"), ("llama", True, "fastpeft")])
def test_outputs_match_hf(case, gks, saver, tmp_path):
    """Experts saved by either library -> both build the Arrow model -> same outputs (and the same GKS'd
    experts)."""
    lib = peft if saver == "peft" else fastpeft
    tasks = save_experts(lib, case, tmp_path, 3)
    general = save_experts(lib, case, tmp_path, 2, seed=10) if gks else None
    ours, theirs = build(fastpeft, case, tasks, general), build(peft, case, tasks, general)
    expected = out(theirs, case)
    assert (expected - out(base(case), case)).abs().max() > 1e-3  # the experts change the output
    torch.testing.assert_close(out(ours, case), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out(ours, case), out(theirs, case), atol=ATOL, rtol=0)  # GKS ran once only
    for name in ("task_0", "task_2"):
        mine, hf = lora_state(ours, name), lora_state(theirs, name)
        assert mine.keys() == hf.keys() and mine
        for key in mine:
            torch.testing.assert_close(mine[key], hf[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw",
                         [dict(top_k=1), dict(top_k=3, router_temperature=0.3), dict(top_k=2, rng_seed=7)])
def test_router_settings_match_hf(kw, tmp_path):
    tasks = save_experts(peft, "mlp", tmp_path, 3)
    ours, theirs = build(fastpeft, "mlp", tasks, **kw), build(peft, "mlp", tasks, **kw)
    torch.testing.assert_close(out(ours, "mlp"), out(theirs, "mlp"), atol=ATOL, rtol=0)


def test_router_structure_matches_hf(tmp_path):
    tasks = save_experts(peft, "llama", tmp_path, 2)
    ours, theirs = build(fastpeft, "llama", tasks), build(peft, "llama", tasks)
    assert ours.active_adapter == theirs.active_adapter == "arrow_router"
    assert sorted(ours.peft_config) == sorted(theirs.peft_config) == ["arrow_router", "task_0", "task_1"]
    mine, hf = ours.peft_config["arrow_router"], theirs.peft_config["arrow_router"]
    assert set(mine.target_modules) == set(hf.target_modules) and mine.r == hf.r
    assert vars(mine.arrow_config) == vars(hf.arrow_config)
    shapes = {k: v.shape for k, v in lora_state(ours, "arrow_router").items()}
    assert shapes == {k: v.shape for k, v in lora_state(theirs, "arrow_router").items()}


def test_expert_added_later_matches_hf(tmp_path):
    """A task adapter loaded after the first forward joins the routing (and is GenKnowSub'ed) in both."""
    tasks = save_experts(peft, "mlp", tmp_path, 4)
    general = save_experts(peft, "mlp", tmp_path, 2, seed=10)
    ours, theirs = build(fastpeft, "mlp", tasks[:3], general), build(peft, "mlp", tasks[:3], general)
    torch.testing.assert_close(out(ours, "mlp"), out(theirs, "mlp"), atol=ATOL, rtol=0)
    for model in (ours, theirs):
        model.load_adapter(tasks[3], adapter_name="task_3")
        model.set_adapter("arrow_router")
    expected = out(theirs, "mlp")
    torch.testing.assert_close(out(ours, "mlp"), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(lora_state(ours, "task_3")["base_model.model.lin0.lora_A.task_3.weight"],
                               lora_state(theirs, "task_3")["base_model.model.lin0.lora_A.task_3.weight"])


# ---------------------------------------------------------------------------------------------- files
def _tree(folder):
    """The adapter files under `folder` (model-card READMEs aside: where they go is save_pretrained's
    business)."""
    return sorted(os.path.relpath(os.path.join(root, f), folder)
                  for root, _, files in os.walk(folder) for f in files
                  if f != "README.md")


def _config(folder, name):
    with open(os.path.join(folder, name, "adapter_config.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "genknowsub"])
def test_saved_arrow_models_match_and_reload_both_ways(gks, tmp_path):
    """Both libraries save the same files (experts after GenKnowSub, router config); each rebuilds the
    other's."""
    tasks = save_experts(peft, "llama", tmp_path, 3)
    general = save_experts(peft, "llama", tmp_path, 2, seed=10) if gks else None
    ours, theirs = build(fastpeft, "llama", tasks, general), build(peft, "llama", tasks, general)
    expected = out(theirs, "llama")
    out(ours, "llama")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert _tree(tmp_path / "ours") == _tree(tmp_path / "theirs")
    for name in ["arrow_router", "task_0", "task_1", "task_2"] + (["gks_0", "gks_1"] if gks else []):
        mine = load_file(tmp_path / "ours" / name / "adapter_model.safetensors")
        hf = load_file(tmp_path / "theirs" / name / "adapter_model.safetensors")
        assert mine.keys() == hf.keys()
        for key in mine:
            if name == "arrow_router" and "lora_A" in key:  # the router's own A: random, never used
                assert mine[key].shape == hf[key].shape
            else:
                torch.testing.assert_close(mine[key], hf[key], atol=1e-6, rtol=0)
    mine_cfg, hf_cfg = (_config(tmp_path / "ours", "arrow_router"),
                        _config(tmp_path / "theirs", "arrow_router"))
    assert mine_cfg["arrow_config"] == hf_cfg["arrow_config"]
    assert set(mine_cfg["target_modules"]) == set(hf_cfg["target_modules"]) and mine_cfg["r"] == hf_cfg["r"]
    # each library rebuilds the other's saved experts (saved after GenKnowSub: plain Arrow over them)
    for lib, folder in ((fastpeft, tmp_path / "theirs"), (peft, tmp_path / "ours")):
        saved = [str(folder / f"task_{i}") for i in range(3)]
        torch.testing.assert_close(out(build(lib, "llama", saved), "llama"), expected, atol=ATOL, rtol=0)


def test_config_file_round_trip(tmp_path):
    """arrow_config loads back as an ArrowConfig without the expert lists (as HF PEFT, init=False fields)."""
    tasks = save_experts(peft, "mlp", tmp_path, 2)
    build(peft, "mlp", tasks).save_pretrained(tmp_path / "hf")
    build(fastpeft, "mlp", tasks).save_pretrained(tmp_path / "fp")
    for folder in (tmp_path / "hf" / "arrow_router", tmp_path / "fp" / "arrow_router"):
        mine = fastpeft.LoraConfig.from_pretrained(folder).arrow_config
        hf = peft.LoraConfig.from_pretrained(folder).arrow_config
        assert isinstance(mine, arrow.ArrowConfig)
        assert vars(mine) == vars(hf)
        assert mine.task_adapter_names is None and mine.top_k == 2 and mine.rng_seed == 0


def test_loading_router_alone_refused_like_hf(tmp_path):
    tasks = save_experts(peft, "mlp", tmp_path, 2)
    build(peft, "mlp", tasks).save_pretrained(tmp_path / "saved")
    for lib in (peft, fastpeft):
        model = lib.PeftModel.from_pretrained(base("mlp"), str(tmp_path / "saved" / "task_0"),
                                              adapter_name="task_0")
        with pytest.raises((AttributeError, ValueError)) as err:
            model.load_adapter(str(tmp_path / "saved" / "arrow_router"), adapter_name="arrow_router")
        if lib is fastpeft:
            assert "task_adapter_names" in str(err.value) and "create_arrow_model" in str(err.value)


# ---------------------------------------------------------------------------------------------- refusals
def _both_refuse(call, error, match, hf_error=None):
    """`call(lib)` raises for HF PEFT (`hf_error`, default `error`) and for fastpeft (`error` matching
    `match`)."""
    with pytest.raises(hf_error or error):
        call(peft)
    with pytest.raises(error, match=match):
        call(fastpeft)


def test_no_task_adapters_refused():
    _both_refuse(lambda lib: build(lib, "mlp", []), ValueError, "at least one adapter")


def test_gks_without_general_adapters_refused(tmp_path):
    tasks = save_experts(peft, "mlp", tmp_path, 2)
    _both_refuse(lambda lib: build(lib, "mlp", tasks, [], top_k=1), ValueError, "general_adapter_paths")


def test_top_k_above_experts_refused(tmp_path):
    """HF PEFT fails at the first forward (torch.topk); fastpeft already when building, with the counts."""
    tasks = save_experts(peft, "mlp", tmp_path, 2)
    _both_refuse(lambda lib: out(build(lib, "mlp", tasks, top_k=3), "mlp"), ValueError,
                 "top_k=3 exceeds the 2", hf_error=RuntimeError)


@pytest.mark.parametrize("kw", [dict(top_k=0), dict(router_temperature=0.0)])
def test_bad_arrow_config_refused(kw):
    _both_refuse(lambda lib: ARROW_CONFIG[lib](**kw), ValueError, "ArrowConfig")


def test_non_linear_experts_refused(tmp_path):
    CASES["conv"] = ("conv2d", dict(target_modules=["conv0", "conv1"], r=4))
    try:
        tasks = save_experts(peft, "conv", tmp_path, 2)
        _both_refuse(lambda lib: build(lib, "conv", tasks), TypeError, "conv0.*Conv2d")
    finally:
        del CASES["conv"]


def test_embedding_parts_not_routed_like_hf(tmp_path, caplog):
    """HF PEFT routes only the linear parts of experts that also adapt embeddings; so does fastpeft (and
    warns)."""
    tasks = save_experts(peft, "llama", tmp_path, 3, target_modules=["embed_tokens", "q_proj", "v_proj"])
    ours, theirs = build(fastpeft, "llama", tasks), build(peft, "llama", tasks)
    assert set(ours.peft_config["arrow_router"].target_modules) == {"q_proj", "v_proj"}
    torch.testing.assert_close(out(ours, "llama"), out(theirs, "llama"), atol=ATOL, rtol=0)
    assert "embed_tokens" in caplog.text


def test_rank_mismatch_refused(tmp_path):
    tasks = save_experts(peft, "mlp", tmp_path, 1) + save_experts(peft, "mlp", tmp_path, 1, seed=5, r=2)
    _both_refuse(lambda lib: build(lib, "mlp", tasks, top_k=1), ValueError, "one LoRA rank")


def test_module_mismatch_refused(tmp_path):
    tasks = save_experts(peft, "mlp", tmp_path, 1) + save_experts(peft, "mlp", tmp_path, 1, seed=5,
                                                                  target_modules=["lin0"])
    _both_refuse(lambda lib: build(lib, "mlp", tasks, top_k=1), ValueError, "same modules")


def test_arrow_with_dora_refused():
    def call(lib):
        return lib.get_peft_model(base("mlp"), lib.LoraConfig(target_modules=["lin0"], use_dora=True,
                                                              arrow_config=ARROW_CONFIG[lib]()))
    _both_refuse(call, ValueError, "use_dora")


def test_merge_refused(tmp_path):
    tasks = save_experts(peft, "mlp", tmp_path, 2)
    _both_refuse(lambda lib: build(lib, "mlp", tasks).merge_and_unload(), RuntimeError, "Arrow router")


def test_mixed_batch_matches_hf(tmp_path):
    """adapter_names per row: the router, the base model and one expert alone, as in HF PEFT."""
    tasks = save_experts(peft, "mlp", tmp_path, 3)
    rows = ["arrow_router", "__base__", "task_1"]
    got = [models.forward(build(lib, "mlp", tasks), {"x": inputs("mlp"), "adapter_names": rows})
           for lib in (fastpeft, peft)]
    torch.testing.assert_close(got[0], got[1], atol=ATOL, rtol=0)
