"""WaveFT (sparse coefficients in a 2-D wavelet domain) against HF PEFT 0.21.2: the wavelet filters and the
inverse transform per family on odd and even layer sizes, seeded init and positions, files both ways,
gradients, merging, several adapters, mixed batches, proportional sizes, refusals. (Rows waveft-* of
tests/cases.py also run through the contract and oracle matrices.)"""

from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from peft.tuners.waveft.wavelet import Wavelet as HFWavelet
from torch import nn

import fastpeft
from fastpeft.methods.waveft import WaveFTConfig, WaveFTLinear, WaveFTModel
from fastpeft.methods.waveft.wavelets import SUPPORTED_WAVELETS, lowpass

import models
import oracle_helpers as oh

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin


class OddMLP(nn.Module):
    """Odd in / out sizes (7 -> 13 -> 9 -> 2): the grid is padded to even sizes and cropped back."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(7, 13), nn.Linear(13, 9), nn.Linear(9, 2)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def make_odd():
    torch.manual_seed(0)
    return OddMLP().eval()


def odd_inputs():
    return torch.randn(3, 7, generator=torch.Generator().manual_seed(1))


models.MODELS.setdefault("waveft_odd", (make_odd, odd_inputs))

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], n_frequency=30)),
    "odd": ("waveft_odd", dict(target_modules=["lin0", "lin1"], n_frequency=25, wavelet_family="db3")),
    "odd_sym": ("waveft_odd", dict(target_modules=["lin0", "lin1"], n_frequency=40, wavelet_family="sym4",
                                   scaling=3.0, random_loc_seed=5, bias="waveft_only")),
    "odd_coif": ("waveft_odd", dict(target_modules=["lin0", "lin1"], n_frequency=20, wavelet_family="coif1")),
    "no_idwt": ("waveft_odd", dict(target_modules=["lin0", "lin1"], n_frequency=20, use_idwt=False)),
    "proportional": ("waveft_odd", dict(target_modules=["lin0", "lin1", "head"], n_frequency=10,
                                        proportional_parameters=True, wavelet_family="db2")),
    "gpt2_conv1d": ("conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], n_frequency=40,
                                        wavelet_family="sym5")),
    "llama": ("llama", dict(task_type="CAUSAL_LM", n_frequency=50, n_frequency_pattern={"v_proj": 20},
                            wavelet_family="db4")),
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM", n_frequency=60, bias="all")),
}
TABLE = oh.CaseTable(CASES, WaveFTConfig, peft.WaveFTConfig, scale=0.3, init_seed=7)
config, base, inputs, build = TABLE.config, TABLE.base, TABLE.inputs, TABLE.build


def close(a, b, what="", atol=ATOL, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("name", SUPPORTED_WAVELETS)
def test_computed_filters_match_the_published_tables(name):
    """The spectral factorisation (and coif1's closed form) gives PyWavelets' low-pass taps."""
    theirs = torch.tensor(HFWavelet(name).rec_lo, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(lowpass(name), dtype=torch.float64), theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("model_name", ["waveft_odd", "mlp", "conv1d_gpt2"])
@pytest.mark.parametrize("wavelet", SUPPORTED_WAVELETS)
def test_weight_change_and_outputs_match_hf(wavelet, model_name):
    """Every supported family on odd (7x13, 13x9) and even layers: the same coefficients give HF PEFT's
    weight change in every layer and its outputs."""
    targets = ["c_fc", "c_proj"] if model_name == "conv1d_gpt2" else ["lin0", "lin1"]
    kwargs = dict(target_modules=targets, n_frequency=24, wavelet_family=wavelet, init_weights=False)
    built = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(3)
        built[lib] = models.perturb(lib.get_peft_model(models.MODELS[model_name][0](), TABLE.classes[lib](
            **kwargs)), 0, 0.3).eval()
    hf_layers = _layers(built[peft], peft.tuners.waveft.WaveFTLayer)
    ours = _layers(built[fastpeft], WaveFTLinear)
    assert set(hf_layers) == set(ours) and hf_layers
    for name, layer in hf_layers.items():
        close(ours[name].dense_delta("default"), layer.get_delta_weight("default"), f"{wavelet} {name}")
    x = models.MODELS[model_name][1]()
    close(models.forward(built[fastpeft], x), models.forward(built[peft], x), "outputs")


@pytest.mark.parametrize("case", ["mlp", "odd", "gpt2_conv1d", "llama", "proportional"])
@pytest.mark.parametrize("init_weights", [True, False])
def test_seeded_init_and_positions_match_hf(case, init_weights):
    """Same seeds: the same coefficients (zeros, or N(0, 0.01^2) from the global RNG), positions and sizes
    in every layer; zero init leaves the outputs unchanged."""
    hf, fp = (TABLE.fresh(lib, case, init_weights=init_weights) for lib in (peft, fastpeft))
    oh.assert_same_state_dict(fp.state_dict(), hf.state_dict())
    hf_layers, fp_layers = _layers(hf, peft.tuners.waveft.WaveFTLayer), _layers(fp, WaveFTLinear)
    assert set(hf_layers) == set(fp_layers) and hf_layers
    for name, layer in hf_layers.items():
        assert torch.equal(layer.waveft_indices["default"], fp_layers[name].waveft_indices["default"]), name
        assert layer.waveft_n_frequency == fp_layers[name].waveft_n_frequency, name
    if init_weights:
        close(models.forward(fp, inputs(case)), models.forward(base(case), inputs(case)), "identity at init")


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    """HF save -> fastpeft load and fastpeft save -> HF load: the same outputs, keys, values and config."""
    oh.assert_loads_both_ways(TABLE, case, tmp_path, close)


@pytest.mark.parametrize("case", ["mlp", "odd_sym", "odd_coif", "gpt2_conv1d", "llama", "no_idwt"])
def test_training_step_gradients_match_hf(case):
    oh.assert_gradients_like_hf(build(fastpeft, case), build(peft, case), inputs(case),
                                partial(close, atol=1e-4), "waveft_spectrum")


def _two_adapters(lib, case):
    model = build(lib, case)
    model.add_adapter("other", config(lib, case, random_loc_seed=11, wavelet_family="sym3"))
    models.perturb(model, 5, 0.3, wanted=lambda n: ".other" in n)
    return model


@pytest.mark.parametrize("case", ["mlp", "odd", "gpt2_conv1d", "llama"])
def test_merge_unmerge_and_unload_match_hf(case):
    """Outputs of the size-100 range here: merged float32 weights differ from HF PEFT's in the last bits."""
    oh.assert_adapters_merge_like_hf(_two_adapters(fastpeft, case), _two_adapters(peft, case),
                                     inputs(case), partial(close, rtol=1e-4))


def test_disable_set_delete_and_mixed_batch_match_hf():
    x = inputs("llama")
    oh.assert_adapter_switching_like_hf(_two_adapters(fastpeft, "llama"), _two_adapters(peft, "llama"), x,
                                        models.forward(base("llama"), x), close)


def test_mixed_batch_runs_each_row_with_its_adapter():
    model = oh.build_with_other(TABLE, fastpeft, "odd", wavelet_family="coif1", target_modules=["lin0"])
    oh.assert_mixed_batch_rows(model, TABLE.inputs("odd"), ["other", "__base__", "default"], close)


def test_two_active_adapters_match_hf():
    oh.assert_two_active_like_hf(TABLE, "odd", close, n_frequency=9, wavelet_family="db1",
                                 target_modules=["lin1"])


def test_config_json_matches_hf(tmp_path):
    ours, theirs = (TABLE.fresh(lib, "odd_sym") for lib in (fastpeft, peft))
    oh.assert_same_config_json(ours, theirs, tmp_path)


def test_bf16_base_matches_hf():
    oh.assert_bf16_base_like_hf(TABLE, "odd")


def test_default_targets_are_hf_table():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING as theirs

    from fastpeft.utils.constants import TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING as ours
    assert ours == theirs


@pytest.mark.parametrize("kwargs,match", [
    (dict(wavelet_family="db11"), r"'db11' is not supported .*supported: db1, db2, .*sym10, coif1"),
    (dict(wavelet_family="coif3"), "not supported"),
    (dict(wavelet_family="haar"), "not supported"),
    (dict(bias="some"), "bias"),
    (dict(target_modules=".*lin.*", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["lin0"], layers_pattern="layers"), "layers_pattern"),
    (dict(n_frequency_pattern=[("lin0", 2)]), "n_frequency_pattern"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WaveFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_frequency=131), r"n_frequency=131 exceeds the 13x7 = 91 weight entries of layer 'lin0'"),
    (dict(n_frequency=5, n_frequency_pattern={"lin1": 118}), "n_frequency=118 exceeds .* layer 'lin1'"),
    (dict(n_frequency=0), "n_frequency must be a positive integer, got 0 for layer 'lin0'"),
])
def test_oversize_n_frequency_names_the_layer_and_leaves_the_model_untouched(kwargs, match):
    model = make_odd()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(model, WaveFTConfig(target_modules=["lin0", "lin1"], **kwargs))
    assert not any(isinstance(m, WaveFTLinear) for m in model.modules())
    oh.assert_same_state_dict(model.state_dict(), before)


def test_other_layer_types_and_unknown_model_types_are_refused():
    with pytest.raises(ValueError, match="cannot wrap module 'emb'"):
        fastpeft.get_peft_model(models.make_emb(), WaveFTConfig(target_modules=["emb"], n_frequency=5))
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(models.make_mlp(), WaveFTConfig(n_frequency=5))
    model = fastpeft.get_peft_model(models.make_mlp(), WaveFTConfig(target_modules=["lin0"], n_frequency=5))
    assert isinstance(model.base_model, WaveFTModel)


def test_low_cpu_mem_usage_load_and_oversize_n_frequency_in_file(tmp_path):
    """Coefficients built on the meta device get the file's values; an n_frequency no model could hold is
    refused from the config file before anything is allocated."""
    model, x = build(fastpeft, "odd_sym"), inputs("odd_sym")
    model.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(make_odd(), str(tmp_path), low_cpu_mem_usage=True)
    close(models.forward(loaded.eval(), x), models.forward(model, x), "meta")
    oh.rewrite_config(tmp_path, n_frequency=10**12)
    with pytest.raises(ValueError, match=r"WaveFTConfig.n_frequency=1000000000000 .* is outside"):
        fastpeft.PeftModel.from_pretrained(make_odd(), str(tmp_path))
