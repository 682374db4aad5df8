"""HF PEFT's helpers and error names served by fastpeft (peft.helpers, peft.utils.error), against HF PEFT."""

from __future__ import annotations

import peft
import peft.helpers
import pytest
import torch

import fastpeft
import fastpeft.helpers

import models


def _pair():
    out = []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(models.make_mlp(), lib.LoraConfig(r=4, target_modules=["lin0", "lin1"],
                                                                    init_lora_weights=False))
        out.append(models.perturb(model, seed=1, scale=0.1).eval())
    return out


@pytest.mark.parametrize("multiplier", [0.0, 0.5, 2])
def test_rescale_adapter_scale_as_hf(multiplier):
    ours, theirs = _pair()
    x = models.mlp_inputs()
    before = ours(x)
    with (fastpeft.helpers.rescale_adapter_scale(ours, multiplier),
          peft.helpers.rescale_adapter_scale(theirs, multiplier)):
        scaled = ours(x)
        torch.testing.assert_close(scaled, theirs(x), atol=1e-6, rtol=1e-6)
    assert (scaled - before).abs().max() > 1e-3 or multiplier == 1
    torch.testing.assert_close(ours(x), before, atol=0, rtol=0)  # restored on exit


def test_rescale_adapter_scale_refusals():
    with (pytest.raises(TypeError, match="multiplier"),
          fastpeft.helpers.rescale_adapter_scale(_pair()[0], "2")):
        pass
    ia3 = fastpeft.get_peft_model(models.make_mlp(), fastpeft.IA3Config(target_modules=["lin0"],
                                                                         feedforward_modules=[]))
    with pytest.raises(NotImplementedError, match="no per-adapter scale"), \
            fastpeft.helpers.rescale_adapter_scale(ia3, 2.0):
        pass


def test_check_if_peft_model(tmp_path):
    _pair()[0].save_pretrained(str(tmp_path / "adapter"))
    assert fastpeft.helpers.check_if_peft_model(str(tmp_path / "adapter"))
    assert not fastpeft.helpers.check_if_peft_model(str(tmp_path))
    assert peft.helpers.check_if_peft_model(str(tmp_path / "adapter"))


def test_no_matching_module_error_as_hf():
    for lib in (fastpeft, peft):
        with pytest.raises(lib.NoMatchingPeftModuleError) as info:
            lib.get_peft_model(models.make_mlp(), lib.LoraConfig(target_modules=["nope"]))
        assert isinstance(info.value, (ValueError, lib.PeftError))
    assert issubclass(fastpeft.NoMatchingPeftModuleError, fastpeft.PeftError)


def test_lora_runtime_config_as_hf():
    assert isinstance(fastpeft.LoraConfig().runtime_config, fastpeft.LoraRuntimeConfig)
    assert "runtime_config" not in fastpeft.LoraConfig().to_dict()
    assert fastpeft.LoraConfig(runtime_config={"ephemeral_gpu_offload": False}).runtime_config == \
        fastpeft.LoraRuntimeConfig()
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        fastpeft.LoraRuntimeConfig(ephemeral_gpu_offload=True)
    peft.LoraRuntimeConfig(ephemeral_gpu_offload=True)  # HF accepts it (and uses it on CUDA only)


def test_cast_mixed_precision_params_as_hf():
    ours, theirs = _pair()
    fastpeft.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    dtypes = [{n: p.dtype for n, p in m.named_parameters()} for m in (ours, theirs)]
    assert dtypes[0] == dtypes[1] and set(dtypes[0].values()) == {torch.bfloat16, torch.float32}
