"""low_cpu_mem_usage=True on big models: adapter weights are built on the meta device and take the file's
tensors; no base weight is copied, moved or materialised, including for a base model loaded with
`device_map` or still on the meta device. (Oracle equality for every method: test_load_options.py.)"""

from __future__ import annotations

import peft
import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import fastpeft
import fastpeft.peft_model as peft_model_module
from fastpeft.errors import AdapterLoadError

from models import llama_inputs, make_llama

CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "loha": lambda: fastpeft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["q_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
}
ADAPTER_PARTS = ("lora_", "hada_", "ia3_")


def _is_adapter(name: str) -> bool:
    return any(part in name for part in ADAPTER_PARTS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny Llama folder and, per method, two trained adapter folders (different weights)."""
    root = tmp_path_factory.mktemp("low_cpu")
    make_llama().save_pretrained(root / "base")
    for method, make_config in CONFIGS.items():
        for i in range(2):
            model = fastpeft.get_peft_model(make_llama(), make_config())
            gen = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():  # non-trivial values (LoRA B / IA3 start at 0 / 1)
                for name, param in model.named_parameters():
                    if _is_adapter(name):
                        param.add_(torch.randn(param.shape, generator=gen) * 0.3)
            model.save_pretrained(str(root / f"{method}_{i}"))
    return root


def _base(files):
    return AutoModelForCausalLM.from_pretrained(str(files / "base"), device_map="cpu").eval()


def _storages(model) -> dict[str, tuple[int, int]]:
    return {_base_name(n): (p.data_ptr(), p.untyped_storage().data_ptr())
            for n, p in model.named_parameters() if not _is_adapter(n)}


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _file(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _spy_loads(monkeypatch) -> list[list[tuple[str, bool]]]:
    """Record, at each state-dict load of from_pretrained / load_adapter, which adapter weights are on
    meta."""
    seen = []
    original = peft_model_module.set_peft_model_state_dict

    def spy(model, state, adapter_name="default", **kwargs):
        seen.append([(n, p.is_meta) for n, p in model.named_parameters()
                     if _is_adapter(n) and adapter_name in n.split(".")])
        return original(model, state, adapter_name=adapter_name, **kwargs)

    monkeypatch.setattr(peft_model_module, "set_peft_model_state_dict", spy)
    return seen


def _assert_equals_file(model, folder, adapter_name: str) -> None:
    ours = fastpeft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    saved = _file(folder)
    assert set(ours) == set(saved)
    for key, value in saved.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("method", list(CONFIGS))
def test_from_pretrained_builds_on_meta_and_copies_no_base_weight(files, method, monkeypatch):
    base = _base(files)
    before = _storages(base)
    with torch.no_grad():
        bare = base(**llama_inputs()).logits
    seen = _spy_loads(monkeypatch)
    model = fastpeft.PeftModel.from_pretrained(base, str(files / f"{method}_0"), low_cpu_mem_usage=True)
    assert seen and seen[0] and all(meta for _, meta in seen[0]), (
        "adapter weights must be on meta until loaded")
    assert _storages(model) == before, "a base weight was copied or replaced"
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    _assert_equals_file(model, files / f"{method}_0", "default")
    normal = fastpeft.PeftModel.from_pretrained(_base(files), str(files / f"{method}_0"))
    with torch.no_grad():
        got, want = model(**llama_inputs()).logits, normal(**llama_inputs()).logits
    assert torch.equal(got, want)
    assert (got - bare).abs().max() > 1e-2, "the adapter must change the outputs (non-vacuous load)"


def test_lora_outputs_equal_hf_peft_normal_load(files):
    ours = fastpeft.PeftModel.from_pretrained(_base(files), str(files / "lora_0"), low_cpu_mem_usage=True)
    theirs = peft.PeftModel.from_pretrained(_base(files), str(files / "lora_0")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**llama_inputs()).logits, theirs(**llama_inputs()).logits,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_load_adapter_of_a_second_adapter(files, method, monkeypatch):
    model = fastpeft.PeftModel.from_pretrained(_base(files), str(files / f"{method}_0"))
    before = _storages(model)
    first = {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(model).items()}
    seen = _spy_loads(monkeypatch)
    model.load_adapter(str(files / f"{method}_1"), "second", low_cpu_mem_usage=True)
    assert seen and seen[0] and all(meta for _, meta in seen[0])
    assert _storages(model) == before
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    _assert_equals_file(model, files / f"{method}_1", "second")
    assert all(torch.equal(v, first[k]) for k, v in fastpeft.get_peft_model_state_dict(model).items())
    normal = fastpeft.PeftModel.from_pretrained(_base(files), str(files / f"{method}_1"))
    model.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(model(**llama_inputs()).logits, normal(**llama_inputs()).logits)


@pytest.mark.parametrize("entry", ["get_peft_model", "inject_adapter_in_model", "add_adapter"])
def test_entry_points_build_on_meta_then_fill_from_the_file(files, entry):
    base = _base(files)
    before = _storages(base)
    config = CONFIGS["lora"]()
    name = "default"
    if entry == "get_peft_model":
        model = fastpeft.get_peft_model(base, config, low_cpu_mem_usage=True)
    elif entry == "inject_adapter_in_model":
        model = fastpeft.inject_adapter_in_model(config, base, low_cpu_mem_usage=True)
    else:
        model, name = fastpeft.get_peft_model(base, CONFIGS["lora"]()), "other"
        model.add_adapter(name, config, low_cpu_mem_usage=True)
    adapter = [(n, p) for n, p in model.named_parameters() if _is_adapter(n) and name in n.split(".")]
    assert adapter and all(p.is_meta for _, p in adapter)
    assert _storages(model) == before
    state = _file(files / "lora_0")
    if entry == "inject_adapter_in_model":
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    fastpeft.set_peft_model_state_dict(model, state, adapter_name=name, low_cpu_mem_usage=True)
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    assert _storages(model) == before
    got = fastpeft.get_peft_model_state_dict(model, adapter_name=name)
    assert all(torch.equal(got[k], v) for k, v in state.items())


def _meta_base(files):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(files / "base")))


def _materialise(model, files) -> None:
    """Give the meta base weights their saved values (what a later checkpoint load does), adapters
    untouched."""
    real = dict(_base(files).named_parameters())
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            module_name, _, local = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, local, torch.nn.Parameter(real[_base_name(name)].detach().clone(),
                                                      requires_grad=False))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_meta_base_loads_adapters_without_materialising_it(files, method):
    model = fastpeft.PeftModel.from_pretrained(_meta_base(files), str(files / f"{method}_0"),
                                               low_cpu_mem_usage=True)
    model.load_adapter(str(files / f"{method}_1"), "second", low_cpu_mem_usage=True)
    base_weights = [p for n, p in model.named_parameters() if not _is_adapter(n)]
    assert base_weights and all(p.is_meta for p in base_weights), "no base weight may be materialised"
    adapters = [p for n, p in model.named_parameters() if _is_adapter(n)]
    assert adapters and not any(p.is_meta for p in adapters), "the adapters hold the file's values"
    _assert_equals_file(model, files / f"{method}_0", "default")
    _assert_equals_file(model, files / f"{method}_1", "second")
    _materialise(model, files)
    normal = fastpeft.PeftModel.from_pretrained(_base(files), str(files / f"{method}_0"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**llama_inputs()).logits, normal(**llama_inputs()).logits,
                                   atol=1e-6, rtol=1e-6)


def _partial_folder(files, tmp_path, method: str):
    """The adapter folder less one tensor."""
    import shutil

    folder = tmp_path / f"{method}_partial"
    shutil.copytree(files / f"{method}_0", folder)
    state = _file(folder)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_file_missing_a_tensor_is_refused_and_leaves_no_meta_tensor(files, tmp_path, method):
    folder = _partial_folder(files, tmp_path, method)
    base = _base(files)
    before = _storages(base)
    with pytest.raises(AdapterLoadError, match="has no values for 1 weight"):
        fastpeft.PeftModel.from_pretrained(base, str(folder), low_cpu_mem_usage=True)
    assert not [n for n, p in base.named_parameters() if p.is_meta or _is_adapter(n)]
    assert _storages(base) == before
    model = fastpeft.PeftModel.from_pretrained(_base(files), str(files / f"{method}_1"))
    kept = {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(model).items()}
    with pytest.raises(AdapterLoadError, match="has no values for 1 weight"):
        model.load_adapter(str(folder), "second", low_cpu_mem_usage=True)
    assert set(model.peft_config) == {"default"}
    assert not [n for n, p in model.named_parameters() if p.is_meta or "second" in n.split(".")]
    assert all(torch.equal(v, kept[k]) for k, v in fastpeft.get_peft_model_state_dict(model).items())


@pytest.mark.parametrize("low", [True, False])
def test_disk_offloaded_base_loads_adapters(files, tmp_path, low):
    """A device_map that offloads a layer to disk: its weights stay on meta (accelerate loads them on use);
    the adapters there hold the file's values, outputs equal a normal load, no 'newly initialised' warning."""
    import warnings

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(str(files / "base"), device_map=device_map,
                                                offload_folder=str(tmp_path / "offload"))
    offloaded = [n for n, p in base.named_parameters() if p.is_meta]
    assert offloaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastpeft.PeftModel.from_pretrained(base, str(files / "lora_0"), low_cpu_mem_usage=low)
    assert not [w for w in caught if "newly initialised" in str(w.message)]
    assert sorted(_base_name(n) for n, p in model.named_parameters() if p.is_meta) == sorted(offloaded)
    _assert_equals_file(model, files / "lora_0", "default")
    normal = fastpeft.PeftModel.from_pretrained(_base(files), str(files / "lora_0"))
    with torch.no_grad():
        assert torch.equal(model(**llama_inputs()).logits, normal(**llama_inputs()).logits)
