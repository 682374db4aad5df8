"""`add_weighted_adapter` for LoRA: oracle tests against HF PEFT, the pure merge math, and the error paths.

Source adapters are built with init_lora_weights=False (B @ A != 0) and different alphas, so a dropped weight,
sign or scaling changes the numbers. SVD factors are compared through their product (unique up to sign).
"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft import merging

import models

ATOL = 1e-5
FACTOR_TYPES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
ALL_TYPES = FACTOR_TYPES + ["cat"] + SVD_TYPES

MLP_ADAPTERS = {  # "t3" leaves lin0 out: the union of targets and per-layer subsets are exercised
    "t1": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8),
    "t2": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=4),
    "t3": dict(target_modules=["lin1"], r=4, lora_alpha=2),
}
LLAMA_ADAPTERS = {
    "t1": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16),
    "t2": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj"], r=4, lora_alpha=4),
}
MIXED_RANKS = {
    "t1": dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=4),
    "t2": dict(target_modules=["lin0", "lin1"], r=6, lora_alpha=3),
    "t3": dict(target_modules=["lin1"], r=4, lora_alpha=8),
}
LAYER_KINDS = {  # embedding and Conv1D store the weight transposed; conv deltas are 4-D; MHA nests out_proj
    "emb": {"t1": dict(target_modules=["emb", "lin"], r=4, lora_alpha=8),
            "t2": dict(target_modules=["emb"], r=4)},
    "conv1d_gpt2": {"t1": dict(target_modules=["c_fc", "c_proj"], r=4, fan_in_fan_out=True),
                    "t2": dict(target_modules=["c_fc"], r=4, lora_alpha=2, fan_in_fan_out=True)},
    "conv2d": {"t1": dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=8),
               "t2": dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=2)},
    "mha": {"t1": dict(target_modules=["mha"], r=4, lora_alpha=8), "t2": dict(target_modules=["mha"], r=4)},
}
MODEL_SETUPS = {"mlp": (MLP_ADAPTERS, [0.7, -1.3, 0.5]), "llama": (LLAMA_ADAPTERS, [1.5, -0.6])}


def build(lib, model_name: str, adapters: dict):
    """A PeftModel of `lib` with the given LoRA adapters, random (non-identity) factors from a fixed seed."""
    base = models.MODELS[model_name][0]()
    torch.manual_seed(1)
    model = None
    for name, kwargs in adapters.items():
        config = lib.LoraConfig(init_lora_weights=False, **kwargs)
        if model is None:
            model = lib.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}


def deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """scaling * B @ A of `adapter` per layer, by module name."""
    out = {}
    for name, layer in lora_layers(model).items():
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            out[name] = (b.flatten(1) @ a.flatten(1)).detach() * layer.scaling[adapter]
    return out


def factors(model, adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if f".{adapter}." in k}


def merged_pair(model_name: str, adapters: dict, weights, seed: int = 5, **kwargs):
    """(HF PEFT model, fastpeft model), each with adapter "new" = add_weighted_adapter(...) and active.

    The source adapters are copied from HF PEFT's model into fastpeft's first, so only the merge is compared.
    """
    theirs, ours = build(peft, model_name, adapters), build(fastpeft, model_name, adapters)
    sources = {k: v for k, v in theirs.state_dict().items() if any(f".{a}." in k for a in adapters)}
    assert not ours.load_state_dict(sources, strict=False).unexpected_keys
    for model in (theirs, ours):
        torch.manual_seed(seed)
        model.add_weighted_adapter(list(adapters), weights, "new", **kwargs)
        model.set_adapter("new")
    return theirs, ours


def assert_same_adapter(theirs, ours, model_name: str, exact_factors: bool) -> None:
    ref, got = deltas(theirs, "new"), deltas(ours, "new")
    assert ref and sorted(ref) == sorted(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=f"delta of {name}")
    assert any(d.abs().max() > 1e-3 for d in ref.values()), "merged adapter is trivially zero"
    if exact_factors:
        ref_f, got_f = factors(theirs, "new"), factors(ours, "new")
        assert sorted(ref_f) == sorted(got_f)
        for key in ref_f:
            torch.testing.assert_close(got_f[key], ref_f[key], atol=ATOL, rtol=0, msg=key)
    inputs = models.MODELS[model_name][1]()
    torch.testing.assert_close(models.forward(ours, inputs), models.forward(theirs, inputs),
                               atol=ATOL, rtol=0)
    assert theirs.peft_config["new"].r == ours.peft_config["new"].r
    assert set(theirs.peft_config["new"].target_modules) == set(ours.peft_config["new"].target_modules)


# ---------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("combination_type", ALL_TYPES)
@pytest.mark.parametrize("model_name", ["mlp", "llama"])
def test_matches_hf_peft(model_name, combination_type):
    adapters, weights = MODEL_SETUPS[model_name]
    theirs, ours = merged_pair(model_name, adapters, weights, combination_type=combination_type, density=0.5)
    # DARE: the same seed before the call gives the same bernoulli draws in both libraries
    assert_same_adapter(theirs, ours, model_name, exact_factors=combination_type not in SVD_TYPES)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "dare_ties_svd"])
@pytest.mark.parametrize("model_name", sorted(LAYER_KINDS))
def test_layer_kinds_match_hf_peft(model_name, combination_type):
    theirs, ours = merged_pair(model_name, LAYER_KINDS[model_name], [0.8, -1.1],
                               combination_type=combination_type, density=0.6)
    assert_same_adapter(theirs, ours, model_name, exact_factors=combination_type not in SVD_TYPES)


@pytest.mark.parametrize("combination_type", ["ties", "dare_ties", "ties_svd", "dare_ties_svd"])
@pytest.mark.parametrize("density", [0.2, 0.8])
def test_frequency_sign_and_density_match_hf_peft(combination_type, density):
    theirs, ours = merged_pair("mlp", MLP_ADAPTERS, [1.0, -0.4, 2.0], combination_type=combination_type,
                               density=density, majority_sign_method="frequency")
    assert_same_adapter(theirs, ours, "mlp", exact_factors=combination_type not in SVD_TYPES)


def test_frequency_and_total_differ():
    """The option reaches the sign election: on these adapters the two methods give different adapters."""
    _, total = merged_pair("mlp", MLP_ADAPTERS, [1.0, -0.4, 2.0], combination_type="ties", density=0.8)
    _, freq = merged_pair("mlp", MLP_ADAPTERS, [1.0, -0.4, 2.0], combination_type="ties", density=0.8,
                          majority_sign_method="frequency")
    assert any(not torch.equal(t, f)
               for t, f in zip(factors(total, "new").values(), factors(freq, "new").values()))


@pytest.mark.parametrize("combination_type", ["cat"] + SVD_TYPES)
def test_different_ranks_match_hf_peft(combination_type):
    theirs, ours = merged_pair("mlp", MIXED_RANKS, [0.5, 1.0, -0.8], combination_type=combination_type,
                               density=0.6)
    assert ours.peft_config["new"].r == (12 if combination_type == "cat" else 6)
    assert_same_adapter(theirs, ours, "mlp", exact_factors=combination_type == "cat")


@pytest.mark.parametrize("svd_rank,svd_clamp", [(2, None), (3, 0.9), (None, 0.7), (10, 0.95)])
def test_svd_rank_and_clamp_match_hf_peft(svd_rank, svd_clamp):
    theirs, ours = merged_pair("mlp", MIXED_RANKS, [0.5, 1.0, -0.8], combination_type="svd",
                               svd_rank=svd_rank, svd_clamp=svd_clamp)
    assert ours.peft_config["new"].r == (svd_rank or 6)
    assert_same_adapter(theirs, ours, "mlp", exact_factors=False)


def test_svd_rank_truncates():
    """Rank-2 SVD of the weighted sum: the new delta has rank <= 2 and is the best rank-2 approximation."""
    _, ours = merged_pair("mlp", MIXED_RANKS, [0.5, 1.0, -0.8], combination_type="svd", svd_rank=2)
    full = {n: sum(w * deltas(ours, a).get(n, 0) for a, w in zip(MIXED_RANKS, [0.5, 1.0, -0.8]))
            for n in deltas(ours, "new")}
    for name, delta in deltas(ours, "new").items():
        assert torch.linalg.matrix_rank(delta) <= 2
        u, s, vh = torch.linalg.svd(full[name])
        torch.testing.assert_close(delta, (u[:, :2] * s[:2]) @ vh[:2], atol=ATOL, rtol=0)


def test_svd_rank_above_layer_size_is_exact():
    """svd_rank larger than a layer's smaller side (lin0 is 10 -> 20): the extra ranks stay zero and the
    delta is the exact weighted sum. (HF PEFT 0.21 fails here with a shape error, so no oracle.)"""
    ours = build(fastpeft, "mlp", MIXED_RANKS)
    ours.add_weighted_adapter(list(MIXED_RANKS), [0.5, 1.0, -0.8], "new", combination_type="svd", svd_rank=16)
    assert ours.peft_config["new"].r == 16
    for name, delta in deltas(ours, "new").items():
        want = sum(w * deltas(ours, a)[name] for a, w in zip(MIXED_RANKS, [0.5, 1.0, -0.8])
                   if name in deltas(ours, a))
        torch.testing.assert_close(delta, want, atol=ATOL, rtol=0)


def test_saved_merged_adapter_loads_in_hf_peft(tmp_path):
    _, ours = merged_pair("mlp", MLP_ADAPTERS, [0.7, -1.3, 0.5], combination_type="ties_svd", density=0.7)
    ours.save_pretrained(tmp_path, selected_adapters=["new"])
    loaded = peft.PeftModel.from_pretrained(models.make_mlp(), tmp_path / "new")
    inputs = models.mlp_inputs()
    assert not torch.allclose(models.forward(loaded, inputs), models.forward(models.make_mlp(), inputs))
    torch.testing.assert_close(models.forward(loaded, inputs), models.forward(ours, inputs),
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- exactness
def test_linear_single_adapter_and_negative_weight_are_exact():
    """One adapter is always merged 'linear' (as HF PEFT): weight -1 gives exactly the negated delta."""
    model = build(fastpeft, "mlp", MLP_ADAPTERS)
    model.add_weighted_adapter(["t1"], [-1.0], "neg")  # default combination_type "svd" -> linear
    for name, delta in deltas(model, "t1").items():
        torch.testing.assert_close(deltas(model, "neg")[name], -delta, atol=ATOL, rtol=0)


def test_cat_is_exact_weighted_sum():
    model = build(fastpeft, "mlp", MIXED_RANKS)
    weights = [0.5, 1.0, -0.8]
    model.add_weighted_adapter(list(MIXED_RANKS), weights, "new", combination_type="cat")
    for name, delta in deltas(model, "new").items():
        want = sum(w * deltas(model, a)[name] for a, w in zip(MIXED_RANKS, weights)
                   if name in deltas(model, a))
        torch.testing.assert_close(delta, want, atol=ATOL, rtol=0)


def test_new_adapter_is_frozen_and_inactive():
    model = build(fastpeft, "mlp", MLP_ADAPTERS)
    model.add_weighted_adapter(["t1", "t2"], [1.0, 1.0], "new", combination_type="linear")
    assert model.active_adapter == "t1"
    assert model.peft_config["new"].lora_alpha == model.peft_config["new"].r == 4
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".new." in n)


def test_sources_can_be_deleted_after_merge():
    model = build(fastpeft, "mlp", MLP_ADAPTERS)
    model.add_weighted_adapter(list(MLP_ADAPTERS), [0.7, -1.3, 0.5], "new", combination_type="cat")
    model.set_adapter("new")
    inputs = models.mlp_inputs()
    before = models.forward(model, inputs)
    for name in MLP_ADAPTERS:
        model.delete_adapter(name)
    assert list(model.peft_config) == ["new"]
    torch.testing.assert_close(models.forward(model, inputs), before)
    model.delete_adapter("new")
    torch.testing.assert_close(models.forward(model, inputs), models.forward(models.make_mlp(), inputs))


# -------------------------------------------------------------------------------------------- DARE statistics
def test_dare_rescaling_is_unbiased():
    """DARE (Yu et al. 2023): about density of the entries survive, scaled by 1/density, so the mean is
    kept."""
    torch.manual_seed(0)
    task = torch.randn(200, 200)
    draws = torch.stack([merging.dare_linear([task], [1.0], density=0.25) for _ in range(40)])
    kept = draws != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(draws[kept], (task.expand_as(draws) / 0.25)[kept])
    ratio = (draws / task).mean().item()  # each entry is 0 or 4x its value: the expectation must be 1x
    assert abs(ratio - 1.0) < 0.02


def test_dare_same_seed_same_adapter():
    results = []
    for seed in (3, 3, 4):
        _, ours = merged_pair("mlp", MLP_ADAPTERS, [0.7, -1.3, 0.5], seed=seed, combination_type="dare_ties",
                              density=0.5)
        results.append(torch.cat([t.flatten() for t in factors(ours, "new").values()]))
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------- pure math
def test_ties_by_hand():
    """TIES-Merging (Yadav et al. 2023): trim to top-|x|, elect the sign, average the agreeing entries."""
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-1.0, -2.0, 4.0, 0.1])
    got = merging.ties([t1, t2], [1.0, 1.0], density=0.5)
    # trimmed: t1 -> [3, 0, 0, 2], t2 -> [0, -2, 4, 0]; elected signs (total): [+, -, +, +]
    torch.testing.assert_close(got, torch.tensor([3.0, -2.0, 4.0, 2.0]))
    weighted = merging.ties([t1, t2], [2.0, 0.5], density=1.0)
    # no trim; signs elected on unweighted sums [2, -3, 4.5, 2.1] -> [+, -, +, +]; mean of agreeing weighted
    torch.testing.assert_close(weighted,
                               torch.tensor([6.0, (-2.0 - 1.0) / 2, (1.0 + 2.0) / 2, (4.0 + 0.05) / 2]))


def test_majority_sign_methods_differ():
    stacked = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert merging.majority_sign_mask(stacked, "total").flatten().tolist() == [True, False, False]
    assert merging.majority_sign_mask(stacked, "frequency").flatten().tolist() == [False, True, True]


def test_magnitude_prune_keeps_top_fraction():
    t = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    torch.testing.assert_close(merging.magnitude_prune([t], [2.0], density=0.4),
                               torch.tensor([0, -10.0, 0, 0, 8.0]))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,match", [
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="t2"), "already exists"),
    (dict(adapters=["t1", "zz"], weights=[1, 1], adapter_name="n"), "do not exist"),
    (dict(adapters=["t1", "t2"], weights=[1], adapter_name="n"), "one weight per adapter"),
    (dict(adapters=[], weights=[], adapter_name="n"), "at least one"),
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="n", combination_type="avg"),
     "combination_type"),
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="n", combination_type="ties"), "density"),
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="n", combination_type="dare_ties", density=0.5,
          majority_sign_method="vote"), "majority_sign_method"),
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="n",
          combination_type="dare_linear", density=0.0),
     "density > 0"),
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="n", svd_clamp=5), "quantile"),
    (dict(adapters=["t1", "t2"], weights=[1, 1], adapter_name="n", svd_rank=0), "svd_rank"),
])
def test_clear_errors_leave_model_unchanged(call, match):
    model = build(fastpeft, "mlp", MLP_ADAPTERS)
    names = set(model.peft_config)
    inputs = models.mlp_inputs()
    before = models.forward(model, inputs)
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**call)
    assert set(model.peft_config) == names
    assert all(".n." not in k for k in model.state_dict())
    torch.testing.assert_close(models.forward(model, inputs), before)


@pytest.mark.parametrize("combination_type", FACTOR_TYPES)
def test_factor_types_refuse_different_ranks(combination_type):
    model = build(fastpeft, "mlp", MIXED_RANKS)
    with pytest.raises(ValueError, match="same rank.*'cat' or an '\\*_svd' type"):
        model.add_weighted_adapter(["t1", "t2"], [1, 1], "n", combination_type=combination_type, density=0.5)
    assert "n" not in model.peft_config


def test_mixed_target_kinds_refused():
    adapters = {"t1": dict(target_modules=["lin0"]), "t2": dict(target_modules=r".*lin1")}
    model = build(fastpeft, "mlp", adapters)
    with pytest.raises(ValueError, match="regex string with a list"):
        model.add_weighted_adapter(["t1", "t2"], [1, 1], "n", combination_type="cat")
    assert "n" not in model.peft_config


def test_regex_targets_are_alternated():
    adapters = {"t1": dict(target_modules=r".*lin0"), "t2": dict(target_modules=r".*lin1")}
    model = build(fastpeft, "mlp", adapters)
    model.add_weighted_adapter(["t1", "t2"], [1, 1], "n", combination_type="cat")
    assert model.peft_config["n"].target_modules == r"(.*lin0)|(.*lin1)"
    assert sorted(deltas(model, "n")) == sorted(set(deltas(model, "t1")) | set(deltas(model, "t2")))


def test_shared_modules_to_save_refused():
    adapters = {n: dict(target_modules=["lin0"], modules_to_save=["head"]) for n in ("t1", "t2")}
    model = build(fastpeft, "mlp", adapters)
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["t1", "t2"], [1, 1], "n", combination_type="cat")


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_rslora_source_combines_exactly(combination_type):
    """A single rsLoRA adapter with weight 1 gives back the same outputs. HF PEFT keeps use_rslora on the new
    adapter and so scales it by sqrt(r); the result here has alpha = r and use_rslora off."""
    model = build(fastpeft, "mlp",
                  {"t1": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=16, use_rslora=True)})
    inputs = models.mlp_inputs()
    before = models.forward(model, inputs)
    model.add_weighted_adapter(["t1"], [1.0], "n", combination_type=combination_type)
    model.set_adapter("n")
    assert model.peft_config["n"].use_rslora is False
    torch.testing.assert_close(models.forward(model, inputs), before, atol=ATOL, rtol=0)


def test_rslora_result_loads_in_hf_peft(tmp_path):
    adapters = {n: dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=a, use_rslora=True)
                for n, a in (("t1", 16), ("t2", 4))}
    model = build(fastpeft, "mlp", adapters)
    model.add_weighted_adapter(["t1", "t2"], [0.6, -1.1], "n", combination_type="cat")
    model.set_adapter("n")
    model.save_pretrained(tmp_path, selected_adapters=["n"])
    theirs = peft.PeftModel.from_pretrained(models.make_mlp(), tmp_path / "n")
    inputs = models.mlp_inputs()
    torch.testing.assert_close(models.forward(theirs, inputs), models.forward(model, inputs),
                               atol=ATOL, rtol=0)


def test_dora_sources_refused_with_model_unchanged():
    """HF PEFT builds a new DoRA adapter whose magnitude is recomputed from the combined factors, silently
    different from every source; fastpeft refuses."""
    adapters = {n: dict(target_modules=["lin0", "lin1"], r=4, use_dora=True) for n in ("t1", "t2")}
    model = build(fastpeft, "mlp", adapters)
    inputs = models.mlp_inputs()
    before = models.forward(model, inputs)
    with pytest.raises(NotImplementedError, match="use_dora.*magnitude vector"):
        model.add_weighted_adapter(["t1", "t2"], [1, 1], "n", combination_type="cat")
    assert "n" not in model.peft_config
    torch.testing.assert_close(models.forward(model, inputs), before)
