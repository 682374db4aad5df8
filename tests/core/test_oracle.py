"""Side-by-side tests against HF PEFT (the oracle).

(a) adapters written by HF PEFT load in fastpeft and give the same outputs;
(b) adapters written by fastpeft load in HF PEFT and give the same outputs, and the files
    fastpeft writes (tensor keys/shapes, adapter_config.json) match what HF PEFT writes for
    the same config on the same base model.

Every adapter parameter is perturbed away from its (identity) initialisation before saving, so
an adapter that is dropped, mis-scaled or mis-keyed on load changes the outputs.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastpeft

import models

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    model: str
    kwargs: dict = field(default_factory=dict)


CASES = [
    Case("mlp", "mlp", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8)),
    Case("mlp_modules_to_save", "mlp", dict(target_modules=["lin0"], modules_to_save=["head"])),
    Case("embedding", "emb", dict(target_modules=["emb", "lin"], r=4, lora_alpha=4)),
    Case("conv1d_gpt2_style", "conv1d_gpt2", dict(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    Case("conv1d", "conv1d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=8)),
    # gconv has groups=2; r must be divisible by groups
    Case("conv2d_groups", "conv2d", dict(target_modules=["conv0", "gconv", "conv1"], r=4, lora_alpha=8)),
    Case("conv3d", "conv3d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=2)),
    Case("mha", "mha", dict(target_modules=["mha"], r=4, lora_alpha=8)),
    Case(
        "llama_qv",
        "llama",
        dict(
            task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.1
        ),
    ),
    Case("llama_all_linear", "llama", dict(task_type="CAUSAL_LM", target_modules="all-linear", r=4)),
    Case(
        "llama_regex",
        "llama",
        dict(
            task_type="CAUSAL_LM",
            target_modules=r".*\.layers\.\d+\.(self_attn\.(q|o)_proj|mlp\.up_proj)",
            r=4,
            lora_alpha=8,
        ),
    ),
    Case(
        "llama_layers_rank_alpha_pattern",
        "llama",
        dict(
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj"],
            layers_to_transform=[0],
            r=8,
            lora_alpha=16,
            rank_pattern={"v_proj": 4, "model.layers.0.self_attn.k_proj": 2},
            alpha_pattern={"q_proj": 32, "v_proj": 2},
        ),
    ),
    Case(
        "llama_rslora_lora_bias",
        "llama",
        dict(
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
            r=4,
            lora_alpha=8,
            use_rslora=True,
            lora_bias=True,
        ),
    ),
    Case(
        "llama_embeddings_and_head",  # HF PEFT then also stores the full base embedding weights
        "llama",
        dict(task_type="CAUSAL_LM", target_modules=["embed_tokens", "lm_head", "q_proj"], r=4, lora_alpha=8),
    ),
    Case(
        "llama_layers_pattern_exclude",
        "llama",
        dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=1,
             layers_pattern="layers", exclude_modules=["v_proj"], init_lora_weights="gaussian", r=4),
    ),
    Case("gpt2_default_targets", "gpt2", dict(task_type="CAUSAL_LM")),
    Case("t5_default_targets", "t5", dict(task_type="SEQ_2_SEQ_LM")),
    Case("bert_seq_cls", "bert_cls", dict(task_type="SEQ_CLS")),
    Case("bert_seq_cls_bias_all", "bert_cls", dict(task_type="SEQ_CLS", bias="all")),
    Case("bert_seq_cls_bias_lora_only", "bert_cls", dict(task_type="SEQ_CLS", bias="lora_only")),
]

CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]
CASES_BY_ID = {c.id: c for c in CASES}


def make_config(lib, kwargs):
    """A fresh LoraConfig of library ``lib`` (configs get mutated by get_peft_model)."""
    kw = copy.deepcopy(kwargs)
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    return lib.LoraConfig(**kw)


def perturb_trainable(model, seed=0):
    """Add seeded noise to every trainable parameter (LoRA A/B, lora bias, modules_to_save copies,
    trainable base biases). Returns the number of tensors touched."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
                n += 1
    assert n > 0, "model has no trainable parameters"
    return n


def assert_close(actual, expected, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_differs(a, b, what=""):
    # guard: the perturbed adapter must actually change the model, otherwise a no-op passes
    assert (a - b).abs().max().item() > 1e-3, f"{what}: adapter does not change the outputs"


def build_hf_adapter(case, save_dir, seed=0):
    factory, inputs_fn = models.MODELS[case.model]
    x = inputs_fn()
    hf_model = peft.get_peft_model(factory(), make_config(peft, case.kwargs))
    perturb_trainable(hf_model, seed)
    hf_model.eval()
    hf_out = models.forward(hf_model, x)
    if save_dir is not None:
        hf_model.save_pretrained(save_dir)
    return hf_model, hf_out


# ----------------------------------------------------------------------------------------------
# (a) HF PEFT -> fastpeft
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    factory, inputs_fn = models.MODELS[case.model]
    x = inputs_fn()
    base_out = models.forward(factory(), x)

    _, hf_out = build_hf_adapter(case, tmp_path)
    assert_differs(hf_out, base_out, "HF PEFT in-memory vs base")
    assert (tmp_path / "adapter_model.safetensors").is_file()

    fp_model = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path))
    fp_model.eval()
    fp_out = models.forward(fp_model, x)
    assert_close(fp_out, hf_out, "fastpeft(loaded HF adapter) vs HF PEFT in-memory")

    # and against HF PEFT's own reload of the same files
    hf_loaded = peft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert_close(fp_out, models.forward(hf_loaded, x), "fastpeft vs HF PEFT (both loaded from disk)")


@pytest.mark.parametrize(
    "case_id", ["mlp", "llama_qv", "gpt2_default_targets", "t5_default_targets", "bert_seq_cls"]
)
def test_from_pretrained_returns_same_task_class(case_id, tmp_path):
    case = CASES_BY_ID[case_id]
    factory, _ = models.MODELS[case.model]
    build_hf_adapter(case, tmp_path)
    hf_loaded = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    fp_loaded = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path))
    assert type(fp_loaded).__name__ == type(hf_loaded).__name__
    hf_new = peft.get_peft_model(factory(), make_config(peft, case.kwargs))
    fp_new = fastpeft.get_peft_model(factory(), make_config(fastpeft, case.kwargs))
    assert type(fp_new).__name__ == type(hf_new).__name__


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_trainable_parameter_counts_match_hf(case):
    factory, _ = models.MODELS[case.model]
    hf_model = peft.get_peft_model(factory(), make_config(peft, case.kwargs))
    fp_model = fastpeft.get_peft_model(factory(), make_config(fastpeft, case.kwargs))
    # (trainable, total) as reported by the public helper
    assert fp_model.get_nb_trainable_parameters() == hf_model.get_nb_trainable_parameters()
    n_fp = sum(p.numel() for p in fp_model.parameters() if p.requires_grad)
    n_hf = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
    assert n_fp == n_hf


@pytest.mark.parametrize("case_id", ["mlp_modules_to_save", "conv2d_groups", "llama_qv", "bert_seq_cls"])
def test_legacy_bin_adapter_loads_in_fastpeft(case_id, tmp_path):
    case = CASES_BY_ID[case_id]
    factory, inputs_fn = models.MODELS[case.model]
    x = inputs_fn()
    hf_model, hf_out = build_hf_adapter(case, tmp_path)

    # replace the safetensors file by a legacy pickle of HF PEFT's adapter state dict
    sd = peft.get_peft_model_state_dict(hf_model)
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save({k: v.detach().clone() for k, v in sd.items()}, tmp_path / "adapter_model.bin")

    fp_model = fastpeft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert_close(models.forward(fp_model, x), hf_out, "fastpeft(adapter_model.bin) vs HF PEFT")


@pytest.mark.parametrize(
    "case_id", ["mlp_modules_to_save", "mha", "llama_rslora_lora_bias", "bert_seq_cls_bias_all"]
)
def test_state_dict_helpers_interoperate(case_id):
    case = CASES_BY_ID[case_id]
    factory, inputs_fn = models.MODELS[case.model]
    x = inputs_fn()
    hf_model, hf_out = build_hf_adapter(case, None)
    hf_sd = peft.get_peft_model_state_dict(hf_model)

    fp_model = fastpeft.get_peft_model(factory(), make_config(fastpeft, case.kwargs))
    fp_sd = fastpeft.get_peft_model_state_dict(fp_model)
    assert set(fp_sd) == set(hf_sd)
    assert {k: tuple(v.shape) for k, v in fp_sd.items()} == {k: tuple(v.shape) for k, v in hf_sd.items()}

    fastpeft.set_peft_model_state_dict(fp_model, {k: v.clone() for k, v in hf_sd.items()})
    fp_model.eval()
    assert_close(models.forward(fp_model, x), hf_out, "fastpeft after set_peft_model_state_dict(HF sd)")


def test_auto_peft_model_for_causal_lm(tmp_path):
    from transformers import LlamaForCausalLM

    case = CASES_BY_ID["llama_qv"]
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    models.make_llama().save_pretrained(str(base_dir))
    x = models.llama_inputs()

    def load_base():
        return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()

    hf_model = peft.get_peft_model(load_base(), make_config(peft, case.kwargs))
    perturb_trainable(hf_model)
    hf_model.eval()
    hf_out = models.forward(hf_model, x)
    hf_model.save_pretrained(str(adapter_dir))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)

    fp_model = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    assert_close(models.forward(fp_model, x), hf_out, "fastpeft AutoPeftModelForCausalLM vs HF PEFT")


# ----------------------------------------------------------------------------------------------
# (b) fastpeft -> HF PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    factory, inputs_fn = models.MODELS[case.model]
    x = inputs_fn()
    base_out = models.forward(factory(), x)

    fp_model = fastpeft.get_peft_model(factory(), make_config(fastpeft, case.kwargs))
    perturb_trainable(fp_model)
    fp_model.eval()
    fp_out = models.forward(fp_model, x)
    assert_differs(fp_out, base_out, "fastpeft in-memory vs base")
    fp_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter_config.json").is_file()

    hf_loaded = peft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert_close(
        models.forward(hf_loaded, x), fp_out, "HF PEFT(loaded fastpeft adapter) vs fastpeft in-memory"
    )


# list-valued config fields whose order carries meaning; every other list is compared as a set
_ORDERED_LIST_FIELDS = {"layer_replication"}


def _normalise_config(cfg):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, list) and k not in _ORDERED_LIST_FIELDS:
            v = sorted(json.dumps(e, sort_keys=True) for e in v)
        out[k] = v
    return out


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_saved_files_match_hf(case, tmp_path):
    factory, _ = models.MODELS[case.model]
    fp_dir, hf_dir = tmp_path / "fastpeft", tmp_path / "hf"

    fastpeft.get_peft_model(factory(), make_config(fastpeft, case.kwargs)).save_pretrained(str(fp_dir))
    peft.get_peft_model(factory(), make_config(peft, case.kwargs)).save_pretrained(str(hf_dir))

    fp_sd = load_file(str(fp_dir / "adapter_model.safetensors"))
    hf_sd = load_file(str(hf_dir / "adapter_model.safetensors"))
    with safe_open(str(fp_dir / "adapter_model.safetensors"), "pt") as f_fp:
        with safe_open(str(hf_dir / "adapter_model.safetensors"), "pt") as f_hf:
            ours = {k: v for k, v in f_fp.metadata().items() if k != "fastpeft_base_fingerprint"}
            # but fastpeft's base-model fingerprint (checkpoint/fingerprint.py)
            assert ours == f_hf.metadata()
    assert sorted(set(fp_sd) - set(hf_sd)) == [] and sorted(set(hf_sd) - set(fp_sd)) == [], (
        f"only in fastpeft: {sorted(set(fp_sd) - set(hf_sd))}; only in HF PEFT: "
        f"{sorted(set(hf_sd) - set(fp_sd))}"
    )
    for k in hf_sd:
        assert fp_sd[k].shape == hf_sd[k].shape, f"{k}: {tuple(fp_sd[k].shape)} != {tuple(hf_sd[k].shape)}"
        assert fp_sd[k].dtype == hf_sd[k].dtype, f"{k}: {fp_sd[k].dtype} != {hf_sd[k].dtype}"

    fp_cfg = json.loads((fp_dir / "adapter_config.json").read_text())
    hf_cfg = json.loads((hf_dir / "adapter_config.json").read_text())
    assert sorted(set(fp_cfg) - set(hf_cfg)) == [] and sorted(set(hf_cfg) - set(fp_cfg)) == [], (
        f"fields only in fastpeft: {sorted(set(fp_cfg) - set(hf_cfg))}; "
        f"only in HF PEFT: {sorted(set(hf_cfg) - set(fp_cfg))}"
    )
    # peft_version records the library (and version) that wrote the file, so the value legitimately
    # differs between the two writers; only require it to be a non-empty string.
    assert isinstance(fp_cfg["peft_version"], str) and fp_cfg["peft_version"]
    fp_cfg.pop("peft_version")
    hf_cfg.pop("peft_version")
    fp_n, hf_n = _normalise_config(fp_cfg), _normalise_config(hf_cfg)
    diffs = {k: (fp_n[k], hf_n[k]) for k in hf_n if fp_n[k] != hf_n[k]}
    assert not diffs, f"adapter_config.json differs (fastpeft, HF PEFT): {diffs}"
