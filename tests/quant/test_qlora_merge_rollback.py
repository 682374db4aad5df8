"""A failed merge on a quantised model is taken back on every layer (quant/merge.py `_merge_all_or_nothing`).

The bug: the rollback only knew the layers whose `merge` call had returned. A plain (not quantised) LoRA layer
that merges its adapters one by one, here `lm_head` with adapters ["default", "b"], and fails on "b" (NaN with
safe_merge=True) kept "default" merged. Now every layer the merge reached is taken back, and the model
computes what HF PEFT computes with the same adapter files unmerged (files saved by either library).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fastpeft  # noqa: E402
from quantised_models import inputs, load_quantised, save_llama  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("tiny_llama"))


def _config(lib):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)


def _with_adapters(lib, base_dir):
    """4-bit model with adapters "default" and "b": small B A (a mergeable update), NaN in b's lm_head."""
    torch.manual_seed(0)
    model = lib.get_peft_model(load_quantised(base_dir, 4), _config(lib))
    model.add_adapter("b", _config(lib))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
        model.base_model.model.lm_head.lora_B["b"].weight.fill_(float("nan"))
    return model


def _load(lib, base_dir, folder):
    model = lib.PeftModel.from_pretrained(load_quantised(base_dir, 4), str(folder))
    model.load_adapter(str(folder / "b"), "b")
    model.set_adapter("default")
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("hf_saves", [True, False])
def test_failed_merge_leaves_no_layer_merged_and_matches_hf_unmerged(base_dir, tmp_path, hf_saves):
    _with_adapters(peft if hf_saves else fastpeft, base_dir).save_pretrained(str(tmp_path))
    want = _logits(_load(peft, base_dir, tmp_path))
    ours = _load(fastpeft, base_dir, tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        ours.base_model.merge_adapter(["default", "b"], safe_merge=True, allow_lossy_merge=True)
    merged = {name: list(m.merged_adapters) for name, m in ours.named_modules()
              if getattr(m, "merged_adapters", None)}
    assert merged == {}
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)
