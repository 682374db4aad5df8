"""EVA init (Paischer et al. 2024, "Explained Variance Adaptation"): rank redistribution within the budget,
whitening, equality with HF PEFT 0.21 on the same data (ranks, alphas, lora_A), files that HF PEFT loads,
errors.
"""

from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft.methods.lora.inits import eva as feva
from fastpeft.methods.lora.inits.eva_config import EvaConfig

import models

R = 4
PREFIX = "base_model.model."


def _batches(n: int = 6, batch: int = 4, seq: int = 16, labels: bool = False, seed: int = 0) -> list[dict]:
    """Random token batches; the last row has right padding, optional labels with -100 on the first half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, -3:] = 0
        item = {"input_ids": ids, "attention_mask": mask}
        if labels:
            item["labels"] = torch.where(torch.arange(seq) < seq // 2, -100, ids)
        out.append(item)
    return out


def _eva_model(lib, targets="all-linear", data=None, state=None, **eva_kw):
    eva_cls = peft.EvaConfig if lib is peft else EvaConfig
    cfg = lib.LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, init_lora_weights="eva",
                         eva_config=eva_cls(**eva_kw))
    base = models.make_llama()
    torch.manual_seed(0)
    model = lib.get_peft_model(base, cfg)
    init = peft.initialize_lora_eva_weights if lib is peft else feva.initialize_lora_eva_weights
    kwargs = {"show_progress_bar": False} if lib is peft else {}
    init(model, dataloader=data, eva_state_dict=state, **kwargs)
    return model


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_A." in k}


def _ranks(model) -> dict[str, int]:
    return {k[len(PREFIX):].split(".lora_A.")[0]: v.shape[0] for k, v in _lora_a(model).items()}


@pytest.mark.parametrize("targets, eva_kw, labels", [
    ("all-linear", {}, False),
    ("all-linear", {"rho": 1.5}, True),
    (["q_proj", "o_proj", "down_proj"], {"whiten": True}, False),  # distinct inputs: HF whitens each once
])
def test_matches_hf_peft(targets, eva_kw, labels):
    data = _batches(labels=labels)
    ours, theirs = _eva_model(fastpeft, targets, data, **eva_kw), _eva_model(peft, targets, data, **eva_kw)
    ocfg, tcfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert ocfg.rank_pattern == tcfg.rank_pattern and ocfg.rank_pattern  # ranks did move
    assert ocfg.alpha_pattern == tcfg.alpha_pattern
    assert sorted(ocfg.target_modules) == sorted(tcfg.target_modules)
    a_ours, a_theirs = _lora_a(ours), _lora_a(theirs)
    assert a_ours.keys() == a_theirs.keys()
    for key in a_ours:  # singular vectors: sign is a convention, compare magnitudes
        torch.testing.assert_close(a_ours[key].abs(), a_theirs[key].abs(), atol=1e-5, rtol=1e-4)
    assert all(v.abs().sum() == 0 for k, v in ours.state_dict().items() if ".lora_B." in k)


def test_budget_kept_and_ranks_follow_explained_variance():
    data = _batches()
    model = _eva_model(fastpeft, data=data)
    ranks = _ranks(model)
    assert sum(ranks.values()) == R * 14  # budget: r x 2 blocks x (q, k, v, o, gate, up, down)
    assert max(ranks.values()) <= round(R * 2.0) and len(set(ranks.values())) > 1
    # alpha follows the rank (adjust_scaling_factors): scaling stays alpha / r
    for name, rank in ranks.items():
        layer = model.get_submodule(PREFIX + name)
        assert layer.r["default"] == rank and layer.scaling["default"] == pytest.approx(2.0)
    assert set(_ranks(_eva_model(fastpeft, data=data, rho=1.0)).values()) == {R}  # rho=1: no redistribution


def test_ranks_take_the_largest_explained_variance_ratios():
    """Greedy property: a layer's last kept ratio is >= every other layer's first dropped one (distinct
    inputs)."""
    data, targets = _batches(), ["q_proj", "o_proj", "down_proj"]
    cfg = fastpeft.LoraConfig(r=R, target_modules=targets, init_lora_weights="eva")
    base = models.make_llama()
    names = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in targets]
    run = feva._EvaRun(base, cfg, names, feva.forward_fn_dict, feva.prepare_model_inputs_fn_language_modeling,
                       feva.prepare_layer_inputs_fn_language_modeling)
    with torch.no_grad():
        run.group_equal_inputs(data[0])
        ranks = run.fit(data)
    assert sum(ranks.values()) == R * len(names) and len(set(ranks.values())) > 1
    ratios = {n: run.svds[n].explained_variance_ratio_ for n in names}
    for a in names:
        for b in names:
            if a != b and ranks[a] > 0 and ranks[b] < run.max_components[b]:
                assert ratios[a][ranks[a] - 1] >= ratios[b][ranks[b]]


def test_components_are_top_input_directions():
    """A's first row is the leading principal direction of the (unmasked) inputs of its layer."""
    data = _batches()
    model = _eva_model(fastpeft, ["o_proj"], data, rho=1.0)
    base, seen = models.make_llama(), []
    handle = base.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        for batch in data:
            base(**batch)
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, data)])
    top = torch.linalg.svd(rows - rows.mean(0), full_matrices=False).Vh[0]
    a = model.get_submodule(PREFIX + "model.layers.0.self_attn.o_proj").lora_A["default"].weight
    assert torch.nn.functional.cosine_similarity(a[0], top, dim=0).abs() > 0.95
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4)  # orthonormal rows without whitening


def test_whiten_scales_rows_by_inverse_sqrt_singular_values():
    data, targets = _batches(), ["o_proj"]
    plain, white = _eva_model(fastpeft, targets, data, rho=1.0), _eva_model(fastpeft, targets, data, rho=1.0,
                                                                              whiten=True)
    key = next(iter(_lora_a(plain)))
    a_plain, a_white = _lora_a(plain)[key], _lora_a(white)[key]
    norms = a_white.norm(dim=1)
    torch.testing.assert_close(a_white / norms[:, None], a_plain, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(norms, torch.ones_like(norms))
    assert torch.all(norms[1:] >= norms[:-1] - 1e-6)  # 1/sqrt(s) grows as s falls


def test_given_state_dict_rank_zero_and_new_rank_match_hf(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {PREFIX + f"model.layers.{i}.self_attn.{p}": torch.randn(n, 32, generator=g)
             for i in range(2) for p, n in (("q_proj", 0 if i == 0 else 4), ("v_proj", 6))}
    ours = _eva_model(fastpeft, ["q_proj", "v_proj"], state={k: v.clone() for k, v in state.items()})
    theirs = _eva_model(peft, ["q_proj", "v_proj"], state={k: v.clone() for k, v in state.items()})
    # rank 0: no LoRA
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    for attr in ("rank_pattern", "alpha_pattern"):
        assert getattr(ours.peft_config["default"], attr) == getattr(theirs.peft_config["default"], attr)
    assert (sorted(ours.peft_config["default"].target_modules)
            == sorted(theirs.peft_config["default"].target_modules))
    a_ours, a_theirs = _lora_a(ours), _lora_a(theirs)
    assert a_ours.keys() == a_theirs.keys()
    for key in a_ours:
        torch.testing.assert_close(a_ours[key], a_theirs[key])


def test_saved_adapter_loads_in_hf_peft_with_equal_outputs(tmp_path):
    data = _batches()
    model = _eva_model(fastpeft, ["q_proj", "o_proj", "down_proj"], data)
    with torch.no_grad():  # stand-in for training: B != 0 so the adapter changes the output
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(models.make_llama(), tmp_path)
    assert loaded.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    batch = {k: v for k, v in data[0].items()}
    with torch.no_grad():
        ours, theirs, base = (model(**batch).logits, loaded(**batch).logits,
                              models.make_llama()(**batch).logits)
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    reloaded = fastpeft.PeftModel.from_pretrained(models.make_llama(), tmp_path)
    assert isinstance(reloaded.peft_config["default"].eva_config, EvaConfig)


def test_errors():
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(r=R, init_lora_weights="eva"))
    with pytest.raises(ValueError, match="dataloader"):
        feva.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="non-empty dataloader"):
        feva.initialize_lora_eva_weights(model, dataloader=[])
    plain = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(r=R))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        feva.initialize_lora_eva_weights(plain, dataloader=_batches(1))
    with pytest.raises(ValueError, match="not supported"):
        fastpeft.LoraConfig(init_lora_weights="evaa")
    with pytest.raises(ValueError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        EvaConfig(tau=1.5)
    with pytest.raises(ValueError, match="peft_config"):
        feva.get_eva_state_dict(models.make_llama(), _batches(1))
    with pytest.raises(ValueError, match="in_features"):  # round(r * rho) > in_features
        feva.get_eva_state_dict(models.make_llama(), _batches(1),
                                fastpeft.LoraConfig(r=20, target_modules=["q_proj"], init_lora_weights="eva"))


def test_config_defaults_and_dict_round_trip():
    cfg = fastpeft.LoraConfig(init_lora_weights="eva")
    assert cfg.eva_config == EvaConfig()
    cfg = fastpeft.LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5, "whiten": True})
    assert cfg.eva_config == EvaConfig(rho=1.5, whiten=True)
    assert cfg.to_dict()["eva_config"]["rho"] == 1.5


def test_injection_zeroes_b_and_keeps_output():
    base = models.make_llama()
    batch = _batches(1)[0]
    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(r=R, init_lora_weights="eva"))
    assert all(v.abs().sum() == 0 for k, v in model.state_dict().items() if ".lora_B." in k)
    assert all(v.abs().sum() > 0 for k, v in model.state_dict().items() if ".lora_A." in k)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits)
