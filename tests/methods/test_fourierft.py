"""FourierFT against HF PEFT 0.21.2: seeded init and spectral locations, files both ways, outputs, gradients,
merging, several adapters, mixed batches, refusals."""

from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft.methods.fourierft import FourierFTConfig, FourierFTModel

import models
import oracle_helpers

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], n_frequency=30)),
    "mlp_options": ("mlp", dict(target_modules=["lin0", "lin1"], n_frequency=25, scaling=12.5,
                                random_loc_seed=3, init_weights=True, bias="fourier_only")),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], n_frequency=40)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", n_frequency=50, n_frequency_pattern={"v_proj": 20})),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", n_frequency=60, bias="all")),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", n_frequency=40)),
    "llama_all_linear": ("llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", n_frequency=16)),
}
# the global RNG in the same state for both libraries before get_peft_model (the spectrum is drawn from it)
TABLE = oracle_helpers.CaseTable(CASES, FourierFTConfig, peft.FourierFTConfig, scale=0.3, init_seed=7)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "mlp_options"])
def test_seeded_init_and_locations_match_hf(case):
    """Same seeds: the same spectrum values and the same spectral locations in every layer."""
    hf, fp = TABLE.fresh(peft, case), TABLE.fresh(fastpeft, case)
    oracle_helpers.assert_same_state_dict(fp.state_dict(), hf.state_dict())
    hf_layers = _layers(hf, peft.tuners.fourierft.FourierFTLayer)
    fp_layers = _layers(fp, fastpeft.core.layer.AdapterLayer)
    assert set(hf_layers) == set(fp_layers) and hf_layers
    for name, layer in hf_layers.items():
        assert torch.equal(layer.indices["default"], fp_layers[name].indices["default"]), name
        assert layer.fourierft_n_frequency == fp_layers[name].fourierft_n_frequency, name
    if CASES[case][1].get("init_weights"):
        close(models.forward(fp, inputs(case)), models.forward(base(case), inputs(case)), "identity at init")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF save -> fastpeft load and fastpeft save -> HF load give the same outputs, keys, values and
    config."""
    hf = build(peft, case)
    oracle_helpers.assert_differs(models.forward(hf, inputs(case)), models.forward(base(case), inputs(case)))
    oracle_helpers.assert_files_both_ways(hf, partial(base, case), inputs(case), tmp_path, close)
    assert any(".fourierft_spectrum" in k
               for k in load_file(str(tmp_path / "hf" / "adapter_model.safetensors")))


def test_fastpeft_built_adapter_loads_in_hf(tmp_path):
    """An adapter created and perturbed by fastpeft alone: HF PEFT loads it and computes the same outputs."""
    fp = build(fastpeft, "llama", seed=3)
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(base("llama"), str(tmp_path)).eval()
    close(models.forward(hf, inputs("llama")), models.forward(fp, inputs("llama")),
          "HF(fastpeft) vs fastpeft")


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama", "gpt2"])
def test_training_step_gradients_match_hf(case):
    oracle_helpers.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case),
                                            partial(close, atol=1e-4), "fourierft_spectrum")


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case, random_loc_seed=11))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    oracle_helpers.assert_adapters_merge_like_hf(_two_adapters(fastpeft, case), _two_adapters(peft, case),
                                                 inputs(case), close)


def test_disable_set_delete_and_mixed_batch_match_hf():
    oracle_helpers.assert_adapter_switching_like_hf(_two_adapters(fastpeft, "llama"),
                                                    _two_adapters(peft, "llama"), inputs("llama"),
                                                    models.forward(base("llama"), inputs("llama")), close)


def test_n_frequency_pattern_follows_hf_lookup():
    """HF matches pattern keys as `.*\\.<key>$` on the full name, then the full name itself."""
    cfg = dict(target_modules=["lin0", "lin1"], n_frequency=30, n_frequency_pattern={"lin0": 5, "lin1": 7})
    hf = peft.get_peft_model(models.make_mlp(), peft.FourierFTConfig(**cfg))
    fp = fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(**cfg))
    for name in ("lin0", "lin1"):
        hf_n = hf.base_model.model.get_submodule(name).fourierft_n_frequency["default"]
        assert fp.base_model.model.get_submodule(name).fourierft_n_frequency["default"] == hf_n


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="n_frequency=500 exceeds"):
        fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(target_modules=["lin0"], n_frequency=500))
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), FourierFTConfig(target_modules=["emb"], n_frequency=5))
    with pytest.raises(ValueError, match="bias must be one of"):
        FourierFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="random_loc_seed"):
        fastpeft.get_peft_model(models.make_mlp(), FourierFTConfig(
            target_modules=["lin0"], random_loc_seed=None, n_frequency=5))
    model = fastpeft.get_peft_model(models.make_mlp(),
                                    FourierFTConfig(target_modules=["lin0"], n_frequency=5))
    assert isinstance(model.base_model, FourierFTModel)
