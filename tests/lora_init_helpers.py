"""CorDA and LoRA-GA inits built the same way in fastpeft and HF PEFT on a model of tests/models.py: the
calibration data / batches, the configs and the preprocess call. Used by their method files
(tests/methods/test_corda.py, test_lora_ga.py) and by the cache-file checks in
tests/safety/test_safety_readers.py."""

from __future__ import annotations

import peft
import torch
from peft.tuners.lora.config import CordaConfig as HFCordaConfig
from peft.tuners.lora.corda import preprocess_corda as hf_preprocess_corda

import fastpeft
from fastpeft.methods.lora.inits.corda import CordaConfig, preprocess_corda
from fastpeft.methods.lora.inits.lora_ga import LoraGAConfig, preprocess_loraga

import models

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "down_proj"],
           "conv1d_gpt2": ["c_fc", "c_proj"]}

# ---------------------------------------------------------------------------------------------- CorDA
CORDA_LIBS = {"fastpeft": (fastpeft, CordaConfig, preprocess_corda),
              "hf": (peft, HFCordaConfig, hf_preprocess_corda)}


def corda_calibration(model_name: str) -> list:
    """Calibration samples, one per forward call (HF PEFT's hook takes a single sample per call)."""
    g = torch.Generator().manual_seed(11)
    if model_name == "llama":
        return [torch.randint(0, 100, (1, 12), generator=g) for _ in range(4)]
    if model_name == "conv1d_gpt2":
        return [torch.randn(1, 8, 10, generator=g) for _ in range(3)]
    return [torch.randn(16, 10, generator=g) for _ in range(3)]


def corda_runner(model, samples):
    def run_model():
        for sample in samples:
            model(sample)
    return run_model


def corda_lora_config(lib_name: str, model_name: str, method: str = "ipm", **kw):
    lib, corda_cls, _ = CORDA_LIBS[lib_name]
    corda_kw = {k: kw.pop(k) for k in ("cache_file", "covariance_file") if k in kw}
    kw = {"target_modules": TARGETS[model_name], "r": 4, "lora_alpha": 8, "init_lora_weights": "corda",
          "corda_config": corda_cls(corda_method=method, **corda_kw), **kw}
    return lib.LoraConfig(**kw)


def build_corda(lib_name: str, model_name: str, method: str = "ipm", run: bool = True, **kw):
    lib, _, pre = CORDA_LIBS[lib_name]
    model = models.MODELS[model_name][0]()
    config = corda_lora_config(lib_name, model_name, method, **kw)
    pre(model, config, run_model=corda_runner(model, corda_calibration(model_name)) if run else None)
    return lib.get_peft_model(model, config)


# -------------------------------------------------------------------------------------------- LoRA-GA
LORAGA_LIBS = {"fastpeft": (fastpeft, LoraGAConfig, preprocess_loraga),
               "hf": (peft, peft.LoraGAConfig, peft.preprocess_loraga)}


def loraga_batches(model_name: str) -> list:
    g = torch.Generator().manual_seed(21)
    if model_name == "llama":
        return [torch.randint(0, 100, (2, 10), generator=g) for _ in range(2)]
    if model_name == "conv1d_gpt2":
        return [torch.randn(2, 6, 10, generator=g) for _ in range(2)]
    return [torch.randn(8, 10, generator=g) for _ in range(3)]


def loraga_trainer(model, model_name: str):
    def train_step():
        for batch in loraga_batches(model_name):
            if model_name == "llama":
                loss = model(input_ids=batch, labels=batch).loss
            else:
                loss = model(batch).pow(2).mean()
            loss.backward()
    return train_step


def loraga_lora_config(lib_name: str, model_name: str, ga=None, **kw):
    lib, ga_cls, _ = LORAGA_LIBS[lib_name]
    kw = {"target_modules": TARGETS[model_name], "r": 3, "lora_alpha": 8, "init_lora_weights": "lora_ga",
          "lora_ga_config": ga_cls(**(ga or {})), **kw}
    return lib.LoraConfig(**kw)


def build_loraga(lib_name: str, model_name: str, ga=None, cache_file=None, train=True, **kw):
    lib, _, pre = LORAGA_LIBS[lib_name]
    model = models.MODELS[model_name][0]()
    config = loraga_lora_config(lib_name, model_name, ga, **kw)
    pre(model, config, train_step=loraga_trainer(model, model_name) if train else None,
        cache_file=cache_file)
    torch.manual_seed(3)  # randomized SVDs and the 'random' direction draw from the global generator
    return lib.get_peft_model(model, config)
