"""Bad input: each case must fail loudly, with a message that names the problem, and leave things as they
were."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import LoraConfig, PeftModel, get_peft_model
from fastpeft.core.layer import AdapterHolder

BAD_NAMES = ["../x", "a/b", "a\\b", ".."]


# ---------------------------------------------------------------------------------------------- helpers
class MLP(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.lin = nn.Linear(8, hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.out(self.act(self.lin(x)))


def make_mlp(hidden: int = 8, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden)


def mlp_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 8, generator=g)


def lora_cfg(**kw) -> LoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", ["lin"])
    return LoraConfig(**kw)


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Make every LoRA factor non-zero so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def snapshot(model: nn.Module):
    """Everything the tests check for 'unchanged': module types, state_dict, requires_grad flags."""
    return {
        "types": {n: type(m) for n, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before) -> None:
    holders = [n for n, m in model.named_modules() if isinstance(m, AdapterHolder)]
    assert holders == [], f"adapter layers left in the model: {holders}"
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["grads"] == before["grads"]


def save_adapter(tmp_path, name: str = "saved", hidden: int = 8, seed: int = 3):
    pm = get_peft_model(make_mlp(hidden), lora_cfg())
    perturb(pm, seed)
    path = tmp_path / name
    pm.save_pretrained(path)
    return pm, path


def listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---------------------------------------------------------------------------------------------- targets
def test_target_modules_matching_nothing_lists_close_names_and_leaves_model_unchanged():
    model = tiny_llama()
    model.train()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        get_peft_model(model, LoraConfig(target_modules=["q_prj"], r=4))
    msg = str(err.value)
    assert "q_prj" in msg
    assert "q_proj" in msg  # the close match is suggested
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")
    # the model is still usable for a correct config afterwards
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=4))
    assert any(isinstance(m, AdapterHolder) for m in pm.modules())


def test_no_match_error_names_the_options_that_narrowed_target_modules():
    # HF: "... Note: You specified 'layers_to_transform': [5]." -- the module names alone do not explain it
    with pytest.raises(ValueError, match=r"after layers_to_transform=\[5\]"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5], r=4))
    with pytest.raises(ValueError, match=r"after exclude_modules="):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"], r=4))


# ---------------------------------------------------------------------------------------------- wrong base
def test_from_pretrained_adapter_for_other_base_names_key_and_shapes_and_leaves_model_unchanged(tmp_path):
    _, path = save_adapter(tmp_path, hidden=8)
    model = make_mlp(hidden=16)
    model.out.weight.requires_grad_(False)  # a non-default flag that must survive the failed load
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(model, path)
    msg = str(err.value)
    assert "lin.lora_B.weight" in msg
    assert "(8, 4)" in msg and "(16, 4)" in msg
    assert_unchanged(model, before)


def test_failed_from_pretrained_leaves_no_peft_attributes_on_the_model(tmp_path):
    _, path = save_adapter(tmp_path, hidden=8)
    model = make_mlp(hidden=16)
    attrs = set(vars(model))
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, path)
    assert set(vars(model)) == attrs, f"new attributes left on the model: {set(vars(model)) - attrs}"
    # and a plain get_peft_model still works on it
    get_peft_model(model, lora_cfg())


def test_load_adapter_for_other_base_leaves_existing_adapter_untouched(tmp_path):
    _, bad = save_adapter(tmp_path, hidden=8)
    pm = get_peft_model(make_mlp(hidden=16), lora_cfg())
    perturb(pm, seed=11)
    x = mlp_input()
    pm.eval()
    with torch.no_grad():
        out_before = pm(x)
    before = {
        "state": {k: v.detach().clone() for k, v in pm.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in pm.named_parameters()},
        "types": {n: type(m) for n, m in pm.named_modules()},
    }
    with pytest.raises(ValueError) as err:
        pm.load_adapter(bad, adapter_name="other")
    msg = str(err.value)
    assert "lin.lora_B.weight" in msg and "(8, 4)" in msg and "(16, 4)" in msg
    assert "other" not in pm.peft_config
    assert pm.active_adapters == ["default"]
    assert not [k for k in pm.state_dict() if "other" in k.split(".")]
    assert not [n for n, _ in pm.named_modules() if "other" in n.split(".")]
    for _, m in pm.named_modules():
        if isinstance(m, AdapterHolder):
            assert m.adapter_names() == {"default"}
    assert list(pm.state_dict()) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(pm.state_dict()[k], v), k
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == before["grads"]
    assert {n: type(m) for n, m in pm.named_modules()} == before["types"]
    with torch.no_grad():
        assert torch.equal(pm(x), out_before)


# ---------------------------------------------------------------------------------------------- missing files
@pytest.mark.parametrize("layout", ["empty folder", "weights without config"])
def test_missing_adapter_config(tmp_path, layout):
    if layout == "empty folder":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        _, path = save_adapter(tmp_path)
        os.remove(path / "adapter_config.json")
        assert (path / "adapter_model.safetensors").is_file()
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        PeftModel.from_pretrained(model, path)
    assert "adapter_config.json" in str(err.value)
    assert str(path) in str(err.value)
    assert_unchanged(model, before)
    # the same through load_adapter on an existing PeftModel
    pm = get_peft_model(make_mlp(), lora_cfg())
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        pm.load_adapter(path, adapter_name="second")
    assert "adapter_config.json" in str(err.value) and str(path) in str(err.value)
    assert list(pm.peft_config) == ["default"]


# ---------------------------------------------------------------------------------------------- adapter names
@pytest.mark.parametrize("name", BAD_NAMES)
def test_get_peft_model_refuses_path_like_adapter_name(name):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        get_peft_model(model, lora_cfg(), adapter_name=name)
    assert repr(name) in str(err.value) or name in str(err.value)
    assert "adapter name" in str(err.value).lower()
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_add_adapter_refuses_path_like_adapter_name(name):
    pm = get_peft_model(make_mlp(), lora_cfg())
    keys = list(pm.state_dict())
    with pytest.raises(ValueError) as err:
        pm.add_adapter(name, lora_cfg())
    assert "adapter name" in str(err.value).lower()
    assert list(pm.peft_config) == ["default"]
    assert list(pm.state_dict()) == keys


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_adapter_refuses_path_like_adapter_name(tmp_path, name):
    _, path = save_adapter(tmp_path)
    files = listing(tmp_path)
    pm = get_peft_model(make_mlp(), lora_cfg())
    keys = list(pm.state_dict())
    with pytest.raises(ValueError) as err:
        pm.load_adapter(path, adapter_name=name)
    assert "adapter name" in str(err.value).lower()
    assert list(pm.peft_config) == ["default"]
    assert list(pm.state_dict()) == keys
    assert listing(tmp_path) == files


@pytest.mark.parametrize("name", BAD_NAMES)
def test_from_pretrained_refuses_path_like_adapter_name(tmp_path, name):
    _, path = save_adapter(tmp_path)
    files = listing(tmp_path)
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(model, path, adapter_name=name)
    assert "adapter name" in str(err.value).lower()
    assert_unchanged(model, before)
    assert listing(tmp_path) == files


# ---------------------------------------------------------------------------------------------- double wrap
def test_get_peft_model_on_base_that_already_has_adapters_points_to_add_adapter():
    pm = get_peft_model(make_mlp(), lora_cfg())
    base = pm.get_base_model()
    with pytest.raises(ValueError) as err:
        get_peft_model(base, lora_cfg())
    assert "add_adapter" in str(err.value)
    assert list(pm.peft_config) == ["default"]


def test_get_peft_model_on_peft_model_points_to_add_adapter():
    pm = get_peft_model(make_mlp(), lora_cfg())
    keys = list(pm.state_dict())
    with pytest.raises(ValueError) as err:
        get_peft_model(pm, lora_cfg())
    assert "add_adapter" in str(err.value)
    assert list(pm.state_dict()) == keys


# ------------------------------------------------------------------------------------------- interrupted save
_KILLED_SAVE = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import torch
    from torch import nn
    import safetensors.torch
    from fastpeft import LoraConfig, get_peft_model

    out_dir = sys.argv[1]

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.act = nn.ReLU()
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.act(self.lin(x)))

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out_dir)  # v1
    shutil.copytree(out_dir, sys.argv[2])  # the exact v1 bytes, for the parent to compare
    print("V1_SAVED", flush=True)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\\x00garbage, half a file")
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = crash
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(1.0)  # v2
    model.peft_config["default"].lora_alpha = 99
    model.save_pretrained(out_dir)
    print("NOT_KILLED", flush=True)
    """
)


def test_save_killed_midway_keeps_previous_adapter_files(tmp_path):
    out_dir = tmp_path / "adapter"
    script = tmp_path / "killed_save.py"
    script.write_text(_KILLED_SAVE)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    v1_dir = tmp_path / "v1_copy"
    proc = subprocess.run([sys.executable, str(script), str(out_dir), str(v1_dir)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert "V1_SAVED" in proc.stdout, proc.stderr
    assert "NOT_KILLED" not in proc.stdout
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    assert sorted(os.listdir(v1_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for fname in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out_dir / fname).read_bytes() == (v1_dir / fname).read_bytes(), fname
    assert json.loads((out_dir / "adapter_config.json").read_text())["lora_alpha"] == 8

    # only the final files, plus the killed save's hidden staging folder (checkpoint/atomic.py)
    extra = sorted(set(os.listdir(out_dir))
                   - {"adapter_model.safetensors", "adapter_config.json", "README.md"})
    assert len(extra) == 1 and re.fullmatch(r"\.fastpeft-staging-.*", extra[0]), extra
    assert os.listdir(out_dir / extra[0]) == ["adapter_model.safetensors"], "the crash did not hit the write"

    # and the folder still loads as v1 (v1 rebuilt here with the script's seeds)
    ref = get_peft_model(make_mlp(8, seed=0), lora_cfg())
    perturb(ref, seed=3)
    x = mlp_input()
    loaded = PeftModel.from_pretrained(make_mlp(), out_dir)
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref(x))
        assert not torch.allclose(loaded(x), ref_model_base_output(x))


def ref_model_base_output(x):
    with torch.no_grad():
        return make_mlp()(x)


# ---------------------------------------------------------------------------------------------- pickles
class _Payload:
    """Unpickling this runs `open(marker, 'w')`, i.e. creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_bin_with_pickled_object_is_refused_and_not_executed(tmp_path):
    pm, path = save_adapter(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    marker = tmp_path / "PWNED"
    tensors = {k: v for k, v in fastpeft.get_peft_model_state_dict(pm).items()}
    tensors["evil"] = _Payload(str(marker))
    torch.save(tensors, path / "adapter_model.bin")

    # sanity: the payload does run under an unsafe load
    probe = tmp_path / "PROBE"
    torch.save({"evil": _Payload(str(probe))}, tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert probe.exists()

    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(model, path)
    msg = str(err.value)
    assert "adapter_model.bin" in msg
    assert "weights_only" in msg
    assert not marker.exists()
    assert_unchanged(model, before)
    with pytest.raises(ValueError):
        fastpeft.load_peft_weights(str(path))
    assert not marker.exists()


def test_legacy_bin_with_plain_tensors_loads(tmp_path):
    pm, path = save_adapter(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    torch.save(dict(fastpeft.get_peft_model_state_dict(pm)), path / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(make_mlp(), path)
    x = mlp_input()
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), pm(x))


# ---------------------------------------------------------------------------------------------- config
def test_unknown_config_key_is_logged_and_ignored(tmp_path, caplog):
    pm, path = save_adapter(tmp_path)
    cfg_path = path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["some_future_field"] = 1
    cfg_path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="fastpeft"):
        loaded = PeftModel.from_pretrained(make_mlp(), path)
    assert any("some_future_field" in r.getMessage() for r in caplog.records), caplog.text
    assert not hasattr(loaded.peft_config["default"], "some_future_field")
    x = mlp_input()
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), pm(x))


def test_unimplemented_lora_option_is_refused_at_get_peft_model_naming_the_option():
    model = make_mlp()
    before = snapshot(model)
    cfg = lora_cfg(use_qalora=True)
    with pytest.raises(NotImplementedError) as err:
        get_peft_model(model, cfg)
    assert "use_qalora" in str(err.value)
    assert_unchanged(model, before)


def test_invalid_init_lora_weights_lists_accepted_values():
    with pytest.raises(ValueError) as err:
        LoraConfig(init_lora_weights="no_such_scheme", target_modules=["lin"])
    msg = str(err.value)
    assert "no_such_scheme" in msg
    assert "gaussian" in msg and "True" in msg and "False" in msg


# ---------------------------------------------------------------------------------------------- file modes
def test_saved_adapter_files_get_the_usual_file_mode(tmp_path):
    """Atomic saves stage in mkstemp files (mode 0600): the final files must get what a plain open() gives
    under the current umask (HF PEFT's config is 0644 under umask 022), so other accounts can read them."""
    umask = os.umask(0o022)
    try:
        ours = get_peft_model(make_mlp(), lora_cfg())
        ours.save_pretrained(tmp_path / "ours")
        with open(tmp_path / "plain", "w") as fh:
            fh.write("x")
    finally:
        os.umask(umask)
    expected = os.stat(tmp_path / "plain").st_mode & 0o777
    for fname in ("adapter_model.safetensors", "adapter_config.json"):
        mode_ours = os.stat(tmp_path / "ours" / fname).st_mode & 0o777
        assert mode_ours == expected, f"{fname}: {oct(mode_ours)}, a plain file gets {oct(expected)}"


# ------------------------------------------------------------------------------------------ config argument
@pytest.mark.parametrize("entry", [PeftModel.from_pretrained, fastpeft.PeftMixedModel.from_pretrained])
def test_a_config_that_is_no_peft_config_is_refused_naming_the_fix(tmp_path, entry):
    _, path = save_adapter(tmp_path)
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"config must be a PeftConfig .*got dict.*config=None"):
        entry(model, str(path), config={"r": 4})  # HF PEFT raises ValueError here too
    import peft

    with pytest.raises(ValueError, match=r"config must be a PeftConfig .*got LoraConfig"):
        entry(model, str(path), config=peft.LoraConfig(target_modules=["lin0"]))  # HF PEFT's own class
    assert_unchanged(model, before)
    given = LoraConfig(**lora_cfg().to_dict() | {"lora_alpha": 5})  # a config object is used as given
    assert entry(make_mlp(), str(path), config=given).peft_config["default"].lora_alpha == 5
