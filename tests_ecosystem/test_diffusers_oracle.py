"""The same diffusers calls with HF PEFT underneath (the oracle, run by the dev venv's Python in a subprocess
so the two `peft` packages never meet) and with fastpeft underneath give the same UNet outputs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ORACLE_PYTHON = os.environ.get("ORACLE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))

# one script, run by both: a tiny UNet gets two LoRA adapters from state dicts, then set_adapters with
# weights, the forward's lora scale, fuse_lora and unfuse_lora each give an output
SCRIPT = """
import sys, torch
if {alias}:
    import fastpeft; fastpeft.install_as_peft()  # before diffusers: it decides on its PEFT backend at import
import diffusers, peft
torch.manual_seed(0)
unet = diffusers.UNet2DConditionModel(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    sample_size=8, norm_num_groups=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
g = torch.Generator().manual_seed(1)
sample, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)
names = sorted(n for n, m in unet.named_modules() if n.endswith(("to_q", "to_v")))

def lora(seed, rank):
    g = torch.Generator().manual_seed(seed)
    sd = {{}}
    for n in names:
        layer = unet.get_submodule(n)
        sd[n + ".lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.1
        sd[n + ".lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    return sd

def run(**kwargs):
    with torch.no_grad():
        return unet(sample, 1, encoder_hidden_states=text, **kwargs).sample

out = {{}}
unet.load_lora_adapter(lora(2, 4), adapter_name="a", prefix=None)
unet.load_lora_adapter(lora(3, 2), adapter_name="b", prefix=None)
unet.set_adapters(["a", "b"], weights=[0.7, -0.4]); out["weighted"] = run()
out["scaled"] = run(cross_attention_kwargs={{"scale": 0.5}})
unet.fuse_lora(lora_scale=0.8); out["fused"] = run()
unet.unfuse_lora(); out["unfused"] = run()
torch.save(out, {out!r})
print(peft.__version__)
"""


def _outputs(python: str, alias: bool, path: Path) -> dict:
    result = subprocess.run([python, "-c", SCRIPT.format(alias=alias, out=str(path))], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path), result.stdout.strip().splitlines()[-1]


def test_diffusers_lora_calls_equal_hf_peft(tmp_path):
    if not Path(ORACLE_PYTHON).exists():
        pytest.fail(f"the oracle's Python {ORACLE_PYTHON} is missing: run `make install` (the "
                    "dev venv has HF PEFT)")
    expected, hf_version = _outputs(ORACLE_PYTHON, False, tmp_path / "hf.pt")
    got, version = _outputs(str(Path(os.sys.executable)), True, tmp_path / "fastpeft.pt")
    assert hf_version == "0.21.2" and version == "0.22.0"  # HF PEFT there, fastpeft here
    assert (expected["weighted"] - expected["unfused"]).abs().max() > 1e-3  # the calls change the output
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)
