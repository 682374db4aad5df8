"""PVeRA against HF PEFT 0.21.2 (the oracle): shared projections bit for bit, init, outputs in eval and in
sampling modes under the same seeds, gradients, adapter files in both directions (with and without saved
projections), merging the mean, several adapters, mixed batches, checkpointing with a private generator,
refusals. (Rows pvera-* of tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

import logging
from functools import partial

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import fastpeft
import quantised_models as qm
from fastpeft.errors import LossyMergeError
from fastpeft.methods.pvera import PveraConfig, PveraLinear, PveraModel

import models
import oracle_helpers as oh
from cases import table_row

CASES = {
    "mlp": ("mlp", dict(r=4, target_modules=["lin0", "lin1", "head"])),
    "mlp_dropout": ("mlp", dict(r=3, target_modules=["lin0", "lin1"], pvera_dropout=0.2)),
    "mlp_seeded": ("mlp", dict(r=4, target_modules=["lin0", "lin1"], generator_seed=11)),
    "gpt2_conv1d": table_row("pvera-gpt2-conv1d"),
    "llama": ("llama", dict(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_default": table_row("pvera-llama"),  # default targets (q_proj, v_proj)
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                              bias="pvera_only")),
    "llama_layer1": ("llama", dict(task_type="CAUSAL_LM", r=4, target_modules=["k_proj", "up_proj"],
                                   layers_to_transform=[1], layers_pattern="layers")),
}
TABLE = oh.CaseTable(CASES, PveraConfig, peft.PveraConfig, scale=0.1)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"{what}: {m}")


def _sampled(model, x, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return models.forward(model, x)


# ---------------------------------------------------------------------------------------------- projections
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("seed", [0, 1234])
def test_projections_bitwise_equal_to_hf(case, seed):
    ours = fastpeft.get_peft_model(base(case), config(fastpeft, case, projection_prng_key=seed))
    theirs = peft.get_peft_model(base(case), config(peft, case, projection_prng_key=seed))
    oh.assert_shared_tensors_equal(ours, theirs, ("pvera_A", "pvera_B"))
    assert isinstance(ours.base_model, PveraModel)


def test_projections_sized_for_the_largest_layer_with_twice_r_rows_in_a():
    # MLP: lin0 (10 -> 20), head (20 -> 2): A covers the widest input (mean and log-variance rows)
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", target_modules=["lin0", "head"]))
    assert model.base_model.pvera_A["default"].shape == (8, 20)
    assert model.base_model.pvera_B["default"].shape == (20, 4)
    assert model.base_model.model.lin0.pvera_lambda_d["default"].shape == (8,)


def test_init_matches_hf():
    for init_weights in (False, True):
        torch.manual_seed(0)
        ours = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", init_weights=init_weights))
        torch.manual_seed(0)
        theirs = peft.get_peft_model(base("mlp"), config(peft, "mlp", init_weights=init_weights))
        oh.assert_same_state_dict(fastpeft.get_peft_model_state_dict(ours),
                                  peft.get_peft_model_state_dict(theirs))
    model = fastpeft.get_peft_model(base("mlp"), config(fastpeft, "mlp", d_initial=0.25))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.pvera_lambda_d["default"], torch.full((8,), 0.25))
    assert not layer.pvera_lambda_b["default"].any()
    model.train()  # sampling changes nothing while lambda_b is zero
    close(models.forward(model, inputs("mlp")), models.forward(base("mlp"), inputs("mlp")), "no-op at init")


# -------------------------------------------------------------------------------------------- outputs / files
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "llama_default", "bert", "llama_layer1"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_files_both_ways(case, save_projection, tmp_path):
    """Built alike, both libraries save the same file; each loads the other's. The projections are stored
    once, under base_model. (not per layer), or not at all."""
    theirs, ours = (build(lib, case, save_projection=save_projection) for lib in (peft, fastpeft))
    x = inputs(case)
    oh.assert_differs(models.forward(ours, x), models.forward(base(case), x))
    close(models.forward(ours, x), models.forward(theirs, x), "built alike")
    oh.assert_files_both_ways(theirs, partial(base, case), x, tmp_path, close)
    ours.save_pretrained(str(tmp_path / "built"))
    oh.assert_same_files(tmp_path / "built", tmp_path / "hf")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert ({"base_model.pvera_A", "base_model.pvera_B"} <= keys) == save_projection
    assert not any(k.endswith((".pvera_A", ".pvera_B")) and k.startswith("base_model.model.") for k in keys)


def test_config_json_matches_hf(tmp_path):
    extra = dict(sample_at_inference=True, generator_seed=3, d_initial=0.05)
    ours, theirs = (TABLE.fresh(lib, "mlp_dropout", **extra) for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


# ------------------------------------------------------------------------------------- sampling / training
@pytest.mark.parametrize("case", ["mlp", "mlp_dropout", "mlp_seeded", "gpt2_conv1d", "llama", "bert"])
def test_training_step_draws_and_gradients_equal_hf(case):
    """Training mode samples the latent (and drops inputs) from the same RNG draws as HF PEFT."""
    ours, theirs, x = build(fastpeft, case), build(peft, case), inputs(case)
    outs = [oh.assert_same_training_step(ours, theirs, x, close, seed)[0] for seed in (0, 1)]
    _, grads = oh.training_step(ours, x, 0)
    assert any(".pvera_lambda_d" in n and g.abs().max() > 1e-5 for n, g in grads.items())
    if case != "mlp_seeded":  # the global RNG's seed picks the noise
        assert (outs[0] - outs[1]).abs().max() > 1e-4, "training mode drew nothing"


def test_eval_uses_the_mean_and_sample_at_inference_samples_like_hf():
    ours, theirs, x = build(fastpeft, "mlp"), build(peft, "mlp"), inputs("mlp")
    close(_sampled(ours, x, 0), _sampled(ours, x, 1), "eval mode is deterministic")
    for model in (ours, theirs):
        for module in model.modules():
            if hasattr(module, "sample_at_inference"):
                module.sample_at_inference["default"] = True
    ours_0, theirs_0 = _sampled(ours, x, 0), _sampled(theirs, x, 0)
    close(ours_0, theirs_0, "sampled in eval mode")
    assert (ours_0 - _sampled(ours, x, 1)).abs().max() > 1e-4


def test_generator_seed_reproduces_hf_draws_in_order(tmp_path):
    """A private generator per adapter: successive calls draw successive noise, the same as HF PEFT's,
    whatever the global seed; a fresh load starts the stream again."""
    ours, theirs = (build(lib, "mlp_seeded", sample_at_inference=True) for lib in (fastpeft, peft))
    x = inputs("mlp")
    first = _sampled(ours, x, 0)
    close(first, _sampled(theirs, x, 5), "first draw")
    second = _sampled(ours, x, 0)
    close(second, _sampled(theirs, x, 9), "second draw")
    assert (first - second).abs().max() > 1e-4
    ours.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(base("mlp"), str(tmp_path)).eval()
    close(_sampled(loaded, x, 3), first, "reloaded: the stream starts again")


def test_checkpointed_training_with_a_private_generator_is_refused():
    """Checkpointing re-runs the forward in backward; the global RNG is replayed, a private generator is not
    (HF PEFT's gradients are then silently off): refused, naming the option."""
    for case, refused in (("mlp", False), ("mlp_seeded", True)):
        model, x = build(fastpeft, case).train(), inputs("mlp")
        torch.manual_seed(0)
        plain = model(x).pow(2).mean()
        plain.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        inner = model.base_model.model.forward
        torch.manual_seed(0)
        loss = checkpoint(inner, x, use_reentrant=False).pow(2).mean()
        if refused:
            with pytest.raises(NotImplementedError, match="generator_seed.*checkpointing"):
                loss.backward()
            continue
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                close(p.grad, want[n], f"checkpointed grad {n}")


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_equal_hf(case):
    oh.assert_merges_like_hf(build(fastpeft, case), build(peft, case), inputs(case), close)


def test_merge_adds_the_mean_and_warns_when_sampling_at_inference(caplog):
    ours, theirs = (build(lib, "mlp", sample_at_inference=True) for lib in (fastpeft, peft))
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        merged = ours.merge_and_unload()
    assert "adds its mean only" in caplog.text
    hf_merged = theirs.merge_and_unload()
    for (name, p), q in zip(merged.state_dict().items(), hf_merged.state_dict().values()):
        close(p, q, f"merged {name}")


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_like_hf(autocast, tmp_path):
    """On a bfloat16 base: HF PEFT's parameter and projection dtypes, its outputs in eval mode and, from the
    same seed, in training mode (noise drawn in the adapter's dtype), its merged weights, its files."""
    built = {lib: models.perturb(lib.get_peft_model(base("mlp").to(torch.bfloat16), config(lib, "mlp"),
                                                    autocast_adapter_dtype=autocast), 0, 0.1)
             for lib in (peft, fastpeft)}
    ours, theirs, x = built[fastpeft], built[peft], inputs("mlp").to(torch.bfloat16)
    assert ({n: p.dtype for n, p in ours.named_parameters()}
            == {n: p.dtype for n, p in theirs.named_parameters()})
    oh.assert_shared_tensors_equal(ours, theirs, ("pvera_A", "pvera_B"))
    for mode in ("train", "eval"):
        out, expected = (_sampled(getattr(m, mode)(), x, 0) for m in (ours, theirs))
        assert out.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(out, expected, msg=mode)
    for model in (ours, theirs):
        model.merge_adapter()
    merged = {n: p for n, p in theirs.named_parameters() if "base_layer" in n}
    for name, weight in ((n, p) for n, p in ours.named_parameters() if "base_layer" in n):
        torch.testing.assert_close(weight, merged[name], atol=5e-4, rtol=1.6e-2, msg=name)
    for lib, model in built.items():
        model.unmerge_adapter()
        model.save_pretrained(str(tmp_path / lib.__name__))
    oh.assert_same_files(tmp_path / "fastpeft", tmp_path / "peft")


# ----------------------------------------------------------------------------------------- several adapters
class TestSharedProjections(oh.SharedProjectionTests):
    """Loaded from the file, shared by a second adapter (as in HF PEFT), dropped on delete, refusals."""

    table, attr, close = TABLE, "pvera_A", staticmethod(close)
    other = dict(d_initial=0.3, pvera_dropout=0.1, generator_seed=2)
    larger_layer = "pvera_A has size 2.* layer 'lin0' .*needs 10|pvera_B has size 2.* layer 'lin0' .*needs 20"


def test_two_active_adapters_like_hf():
    oh.assert_two_active_like_hf(TABLE, "mlp", close, d_initial=0.2)


def _with_other(case: str, **extra):
    model = build(fastpeft, case, **extra)
    model.add_adapter("other", config(fastpeft, case, d_initial=0.3, **extra))
    return models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)


def test_mixed_batch_rows_use_their_own_adapter():
    """HF PEFT 0.21's PVeRA drops adapter_names (every row gets the active adapter); here each row gets its
    own adapter's mean in eval mode."""
    model, x = _with_other("mlp"), inputs("mlp")[:3]
    oh.assert_mixed_batch_rows(model, x, ["other", "__base__", "default"], close)


def test_mixed_batch_rows_sample_from_their_own_adapter():
    """Training mode: each row draws from its own adapter's latent. Adapting only the output layer keeps the
    output linear in the latent, so the mean of many draws of one input tends to that adapter's eval output
    (within 5 standard errors), and the two adapters' eval outputs lie further apart than that."""
    model, x = _with_other("mlp", target_modules=["head"]), inputs("mlp")[:1]
    names = ["other", "default"] * 400
    torch.manual_seed(0)
    with torch.no_grad():
        draws = model.train()(x.expand(len(names), -1), adapter_names=names)
    model.eval()
    means = {}
    for name, rows in (("other", draws[0::2]), ("default", draws[1::2])):
        model.base_model.set_adapter(name)
        means[name] = models.forward(model, x)[0]
        error = 5 * rows.std(0) / len(rows) ** 0.5
        assert rows.std(0).min() > 1e-3, f"{name}: training mode drew nothing"
        assert ((rows.mean(0) - means[name]).abs() <= error).all(), name
    assert ((means["other"] - means["default"]).abs() > error).any()


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad, match", [
    ({"r": 0}, "PveraConfig.r must be a positive integer"),
    ({"bias": "vera_only"}, "PveraConfig.bias must be one of"),
    ({"pvera_dropout": 1.0}, "dropout"),
    ({"layers_pattern": "layers"}, "layers_to_transform"),
    ({"generator_seed": "7"}, "generator_seed"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        PveraConfig(target_modules=["lin0"], **bad)


def test_unsupported_layer_is_refused_and_the_model_left_alone():
    model = models.make_emb()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(model, PveraConfig(r=4, target_modules=["emb", "lin"]))
    assert not any(isinstance(m, PveraLinear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), PveraConfig(r=2))


def test_low_cpu_mem_usage_load_and_oversize_r_in_file(tmp_path):
    """lambda_b / lambda_d built on the meta device get the file's values (the projections too); an r no
    model could hold is refused from the config file before anything is allocated."""
    model, x = build(fastpeft, "mlp"), inputs("mlp")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    assert not any(p.is_meta for p in loaded.parameters())
    oh.rewrite_config(tmp_path, r=10**9)
    with pytest.raises(ValueError, match=r"PveraConfig.r=1000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(models.make_mlp(), str(tmp_path))


# ------------------------------------------------------------------------- bitsandbytes 4-bit / 8-bit layers
QUANT_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return qm.save_llama(tmp_path_factory.mktemp("llama64"))


def _quantised_pair(folder, bits: int):
    """(fastpeft, HF PEFT) PVeRA on the same quantised tiny Llama, HF's perturbed lambdas copied into ours."""
    make = lambda lib: lib.PveraConfig(target_modules=QUANT_TARGETS, r=8, init_weights=False)  # noqa: E731
    torch.manual_seed(0)
    theirs = models.perturb(peft.get_peft_model(qm.load_quantised(folder, bits), make(peft)), 1, 0.1)
    ours = fastpeft.get_peft_model(qm.load_quantised(folder, bits), make(fastpeft))
    hf_state = peft.get_peft_model_state_dict(theirs)
    result = fastpeft.set_peft_model_state_dict(ours, hf_state)
    assert not result.missing_keys and not result.unexpected_keys, result
    return ours, theirs


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_layers_train_and_run_like_hf(llama_folder, bits):
    """HF PEFT's layer classes, a training step (sampled) and eval logits as HF PEFT. The training step runs
    first: bitsandbytes' CPU 4-bit kernel repacks the weights on the first eval forward and has no
    backward."""
    ours, theirs = _quantised_pair(llama_folder, bits)
    layers = {type(m).__name__ for m in ours.base_model.adapter_layers()}
    hf_layer = peft.tuners.pvera.PveraLayer
    assert layers == {type(m).__name__ for m in theirs.modules() if isinstance(m, hf_layer)}
    assert layers == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    _, grads = oh.assert_same_training_step(ours, theirs, qm.inputs(), close)
    assert any("pvera_lambda_d" in n and g.abs().max() > 0 for n, g in grads.items())
    ours.eval(), theirs.eval()
    expected = qm.logits(theirs)
    with theirs.disable_adapter():
        oh.assert_differs(expected, qm.logits(theirs))
    close(qm.logits(ours), expected, "logits")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_merge_requantises_under_the_policy(llama_folder, bits):
    """The mean's update is added to the dequantised weight and requantised only under the merge policy;
    unmerging restores the quantised bytes."""
    ours, _ = _quantised_pair(llama_folder, bits)
    expected = qm.logits(ours.eval())
    weights = [layer.get_base_layer().weight.data.clone() for layer in ours.base_model.adapter_layers()]
    with pytest.raises(LossyMergeError, match="allow_lossy_merge=True"):
        ours.base_model.merge_adapter(max_merge_error=0.0)
    ours.base_model.merge_adapter(allow_lossy_merge=True)
    assert all(layer.merged for layer in ours.base_model.adapter_layers())
    ours.base_model.unmerge_adapter()
    for layer, weight in zip(ours.base_model.adapter_layers(), weights):
        assert torch.equal(layer.get_base_layer().weight.data, weight)
    close(qm.logits(ours), expected, "unmerged")
