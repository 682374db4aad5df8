"""Oracle checks shared by the method test files: the same adapter in fastpeft and HF PEFT must give the same
files, outputs, gradients and merged weights. `close(actual, expected, what)` is each file's comparison."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file

import fastpeft

import models


def unordered(value):
    """Config values compared without order (HF PEFT writes sets in hash order)."""
    return sorted(value, key=str) if isinstance(value, list) else value


def assert_same_files(ours: Path, theirs: Path, fields=None, exact: bool = True) -> None:
    """Same safetensors keys, dtypes and values (bitwise unless `exact=False`) and the same config `fields`
    (all fields but peft_version when None)."""
    a = load_file(str(Path(ours) / "adapter_model.safetensors"))
    b = load_file(str(Path(theirs) / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    ca, cb = (json.loads((Path(p) / "adapter_config.json").read_text()) for p in (ours, theirs))
    keys = (set(ca) | set(cb)) - {"peft_version"} if fields is None else fields
    assert {k: unordered(ca.get(k)) for k in keys} == {k: unordered(cb.get(k)) for k in keys}


def assert_files_both_ways(theirs, base, inputs, tmp_path: Path, close, exact: bool = True) -> None:
    """HF PEFT model `theirs` saved -> loaded by fastpeft (same outputs) -> saved by fastpeft (same files) ->
    loaded by HF PEFT (same outputs). `base()` builds a fresh base model, `inputs` feeds `models.forward`."""
    expected = models.forward(theirs, inputs)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = fastpeft.PeftModel.from_pretrained(base(), str(tmp_path / "hf")).eval()
    close(models.forward(ours, inputs), expected, "HF file -> fastpeft")
    ours.save_pretrained(str(tmp_path / "ours"))
    assert_same_files(tmp_path / "ours", tmp_path / "hf", exact=exact)
    back = peft.PeftModel.from_pretrained(base(), str(tmp_path / "ours")).eval()
    close(models.forward(back, inputs), expected, "fastpeft file -> HF")


def gradients(model, inputs) -> dict[str, torch.Tensor]:
    """Gradients of mean(output^2) w.r.t. every trainable parameter, by name (training mode)."""
    model.train()
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    (out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(ours, theirs, inputs, close) -> None:
    a, b = gradients(ours, inputs), gradients(theirs, inputs)
    assert sorted(a) == sorted(b)
    for name in a:
        close(a[name], b[name], f"grad {name}")


def assert_merges_like_hf(ours, theirs, inputs, close, safe_merge: bool = False) -> None:
    """merge / unmerge keep the outputs and restore the base; merge_and_unload gives HF PEFT's weights."""
    expected = models.forward(theirs, inputs)
    models.assert_merge_roundtrip(ours, inputs, expected, close, safe_merge=safe_merge)
    merged_ours, merged_theirs = ours.merge_and_unload(safe_merge=safe_merge), theirs.merge_and_unload()
    close(models.forward(merged_ours, inputs), expected, "merge_and_unload")
    sd_a, sd_b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for key in sd_a:
        close(sd_a[key], sd_b[key], f"merged {key}")
