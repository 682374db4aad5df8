"""LoRA+ and LoRA-FA optimizers: parameter groups and training steps against HF PEFT's `peft.optimizers`."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import lorafa as hf_lorafa
from torch import nn

import fastpeft
from fastpeft.optimizers import LoraFAOptimizer, create_lorafa_optimizer, create_loraplus_optimizer

from models import llama_inputs, make_llama

R, ALPHA = 4, 8


class EmbMLP(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear head: LoRA on embedding and linears, LayerNorm / head
    saved."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.emb = nn.Embedding(30, 8)
        self.lin0 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.head(torch.relu(self.lin1(self.ln(self.lin0(self.emb(input_ids))))))


def _mlp_loss(model):
    ids = torch.tensor([[1, 5, 7, 2], [9, 3, 3, 0]])
    return model(input_ids=ids).pow(2).mean()


def _llama_loss(model):
    inputs = llama_inputs()
    return model(**inputs, labels=inputs["input_ids"]).loss


MLP_CFG = {"target_modules": ["emb", "lin0", "lin1"], "modules_to_save": ["ln", "head"], "bias": "lora_only"}
LLAMA_CFG = {"target_modules": ["embed_tokens", "q_proj", "v_proj", "down_proj"],
             "modules_to_save": ["lm_head"]}
CASES = {"mlp": (EmbMLP, MLP_CFG, _mlp_loss), "llama": (make_llama, LLAMA_CFG, _llama_loss)}


def _pair(case: str, **extra):
    """The same base model wrapped by fastpeft and by HF PEFT, with identical (non-zero) adapter weights."""
    factory, cfg, loss_fn = CASES[case]
    kwargs = {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "init_lora_weights": False, **cfg, **extra}
    ours = fastpeft.get_peft_model(factory(), fastpeft.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**kwargs))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(ours_params[name])  # same names for plain LoRA; a KeyError here is a naming bug
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    return ours, theirs, loss_fn


def _group_view(model, optimizer, keys=("lr", "weight_decay")):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({k: g[k] for k in keys}, [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


def _train(model, optimizer, loss_fn, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model).backward()
        optimizer.step()


def _assert_same_weights(ours, theirs, atol=1e-6):
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, theirs_params[name], atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------ LoRA+
LORAPLUS_KW = {"lr": 2e-3, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": 0.1,
               "loraplus_lr_embedding": 5e-3}


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_loraplus_groups_match_hf(case):
    ours, theirs, _ = _pair(case)
    opt_ours = create_loraplus_optimizer(ours, torch.optim.AdamW, **LORAPLUS_KW)
    opt_theirs = peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **LORAPLUS_KW)
    view = _group_view(ours, opt_ours)
    assert view == _group_view(theirs, opt_theirs)
    (a, emb, b, b_nd) = view
    assert a[0] == {"lr": 2e-3, "weight_decay": 0.1} and b[0] == {"lr": 2e-3 * 16, "weight_decay": 0.1}
    assert emb[0]["lr"] == 5e-3 and b_nd[0]["weight_decay"] == 0.0
    assert any(".lora_B." in n for n in b[1]) and not any(".lora_B." in n for n in a[1])
    assert emb[1] and all("lora_embedding_" in n for n in emb[1])
    if case == "mlp":  # the LayerNorm copy and biases are B-group vectors without decay
        assert "base_model.model.ln.modules_to_save.default.weight" in b_nd[1]
        assert "base_model.model.lin0.base_layer.bias" in b_nd[1]
        assert "base_model.model.head.modules_to_save.default.weight" in a[1]


def test_loraplus_defaults_and_kwargs():
    ours, _, _ = _pair("mlp")
    opt = create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4, momentum=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-6, 0.4, 0.4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0] * 4
    assert all(g["momentum"] == 0.5 for g in opt.param_groups)


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_loraplus_steps_match_hf(case):
    ours, theirs, loss_fn = _pair(case)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_B" in n}
    _train(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **LORAPLUS_KW), loss_fn)
    _train(theirs, peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **LORAPLUS_KW),
           loss_fn)
    _assert_same_weights(ours, theirs)
    assert any(not torch.equal(p, before[n]) for n, p in ours.named_parameters() if n in before)


# ------------------------------------------------------------------------------------------------ LoRA-FA
@pytest.fixture
def hf_full_precision(monkeypatch):
    """HF PEFT projects B's gradient under bfloat16 autocast when bf16 is available; fastpeft keeps the
    parameters' precision. Compare the algorithms with HF in full precision too."""
    monkeypatch.setattr(hf_lorafa, "is_bf16_available", lambda: False)


def _factors(model):
    """(A, B, scaling) per LoRA adapter, found through the layers."""
    from fastpeft.methods.lora.layer import LoraLayer
    from fastpeft.optimizers.loraplus import lora_factors

    out = []
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in sorted(layer.adapter_names()):
                a, b = lora_factors(layer, name)
                out.append((a, b, layer.scaling[name]))
    return out


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_lorafa_groups_match_hf(case):
    ours, theirs, _ = _pair(case)
    opt_ours = create_lorafa_optimizer(ours, r=R, lora_alpha=ALPHA, lr=3e-3, weight_decay=0.05)
    opt_theirs = peft.optimizers.create_lorafa_optimizer(theirs, r=R, lora_alpha=ALPHA, lr=3e-3,
                                                         weight_decay=0.05)
    keys = ("lr", "weight_decay", "betas", "names")
    assert _group_view(ours, opt_ours, keys) == _group_view(theirs, opt_theirs, keys)
    (g_ours,), (g_theirs,) = opt_ours.param_groups, opt_theirs.param_groups
    for name, s_ours, s_theirs in zip(g_ours["names"], g_ours["scaling_factors"],
                                      g_theirs["scaling_factors"]):
        if ".lora_A." in name or ".lora_B." in name or "lora_embedding" in name:
            assert s_ours == s_theirs == ALPHA / R, name
        else:
            assert s_ours is None, name
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert {n for n, p in theirs.named_parameters() if not p.requires_grad and "lora_A" in n} <= frozen
    for a, b, _ in _factors(ours):
        # HF leaves lora_embedding_A trainable but never steps it
        assert not a.requires_grad and b.requires_grad


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_lorafa_steps_match_hf(case, hf_full_precision):
    ours, theirs, loss_fn = _pair(case)
    a_before = [a.detach().clone() for a, _, _ in _factors(ours)]
    kw = dict(r=R, lora_alpha=ALPHA, lr=1e-2, weight_decay=0.01)
    _train(ours, create_lorafa_optimizer(ours, **kw), loss_fn)
    _train(theirs, peft.optimizers.create_lorafa_optimizer(theirs, **kw), loss_fn)
    _assert_same_weights(ours, theirs)
    for (a, _, _), a0 in zip(_factors(ours), a_before):
        assert torch.equal(a, a0)  # A never moves


def test_lorafa_uses_projected_gradient_on_b():
    ours, _, loss_fn = _pair("mlp", lora_alpha=6)  # scaling 1.5: a missing s^-2 factor shows
    opt = create_lorafa_optimizer(ours, r=R, lora_alpha=6, lr=1e-2)
    loss_fn(ours).backward()
    grads = {id(b): b.grad.clone() for _, b, _ in _factors(ours)}
    opt.step()
    beta1 = opt.param_groups[0]["betas"][0]
    for a, b, scaling in _factors(ours):
        assert a.grad is None and id(a) not in opt.state
        gram = a @ a.T
        expected = torch.linalg.solve(gram, grads[id(b)].T).T / scaling**2  # g_B (A A^T)^-1 / s^2
        torch.testing.assert_close(opt.state[b]["exp_avg"], (1 - beta1) * expected, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(expected, grads[id(b)], rtol=1e-2)  # the projection is not the identity


def test_lorafa_pairs_each_adapter_with_its_own_a():
    model = fastpeft.get_peft_model(EmbMLP(), fastpeft.LoraConfig(r=2, target_modules=["lin0"],
                                                                   init_lora_weights=False))
    model.add_adapter("other", fastpeft.LoraConfig(r=3, lora_alpha=9, target_modules=["lin0"],
                                                   init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    opt = create_lorafa_optimizer(model, r=2, lora_alpha=8, lr=1e-2)
    _mlp_loss(model).backward()
    grads = {id(b): b.grad.clone() for _, b, _ in _factors(model)}
    opt.step()
    assert len(_factors(model)) == 2
    for a, b, scaling in _factors(model):
        expected = torch.linalg.solve(a @ a.T, grads[id(b)].T).T / scaling**2
        torch.testing.assert_close(opt.state[b]["exp_avg"], 0.1 * expected, rtol=1e-4, atol=1e-7)


def test_lorafa_optimizer_state_dict_roundtrip():
    ours, _, loss_fn = _pair("mlp")
    opt = create_lorafa_optimizer(ours, r=R, lora_alpha=ALPHA, lr=1e-2)
    _train(ours, opt, loss_fn, steps=1)
    clone = create_lorafa_optimizer(ours, r=R, lora_alpha=ALPHA, lr=1e-2)
    clone.load_state_dict(opt.state_dict())
    b = _factors(ours)[0][1]
    torch.testing.assert_close(clone.state[b]["exp_avg"], opt.state[b]["exp_avg"])


# ------------------------------------------------------------------------------------------------ errors
def test_non_lora_model_is_refused():
    with pytest.raises(ValueError, match="no LoRA layers"):
        create_loraplus_optimizer(EmbMLP(), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="no LoRA layers"):
        create_lorafa_optimizer(EmbMLP(), r=R, lora_alpha=ALPHA, lr=1e-3)


def test_missing_lr_is_refused():
    ours, _, _ = _pair("mlp")
    with pytest.raises(TypeError, match="lr"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, loraplus_lr_ratio=16)
    with pytest.raises(TypeError, match="lr"):
        create_lorafa_optimizer(ours, r=R, lora_alpha=ALPHA)


def test_lorafa_rejects_bad_hyperparameters_and_foreign_groups():
    param = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Learning rate"):
        LoraFAOptimizer([param], lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        LoraFAOptimizer([param], betas=(0.9, 1.0))
    opt = LoraFAOptimizer([{"params": [param], "scaling_factors": [2.0]}])
    param.grad = torch.ones(2)
    with pytest.raises(ValueError, match="lora_pairs"):
        opt.step()


def test_lorafa_deprecated_use_rslora():
    ours, _, _ = _pair("mlp")
    with pytest.raises(ValueError, match="use_rslora"):
        create_lorafa_optimizer(ours, r=R, lora_alpha=ALPHA, lr=1e-3, use_rslora=True)
    with pytest.warns(FutureWarning, match="deprecated"):
        create_lorafa_optimizer(ours, r=R, lora_alpha=ALPHA, lr=1e-3, use_rslora=False)
