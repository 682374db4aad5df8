"""Mixed batches (adapter_names=[...]) in a training forward under activation checkpointing.

Checkpointed blocks are re-run in backward, after the call has reset the per-row names, so the re-run would
use the active adapter for every row: reentrant checkpointing gave silently wrong gradients (the second
adapter got none), non-reentrant a CheckpointError about tensor counts. fastpeft refuses that combination with
a clear error; HF PEFT refuses adapter_names in any training forward. A checkpointed model in eval mode (or in
train mode under no_grad) still runs mixed batches, matching HF PEFT on the same adapter files saved by either
library.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.errors import AdapterStateError  # noqa: E402

from models import make_llama  # noqa: E402

ROWS = ["default", "other"]


def _config(lib):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          lora_dropout=0.0)


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (len(ROWS), 6), generator=torch.Generator().manual_seed(1))


def _two_adapters(lib, checkpointing: bool, reentrant: bool = True):
    torch.manual_seed(0)
    base = make_llama()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = lib.get_peft_model(base, _config(lib))
    torch.manual_seed(1)
    model.add_adapter("other", _config(lib))
    return model


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_mixed_training_forward_is_refused(reentrant):
    ours = _two_adapters(fastpeft, checkpointing=True, reentrant=reentrant).train()
    with pytest.raises(AdapterStateError, match="activation checkpointing"):
        ours(input_ids=_ids(), labels=_ids(), adapter_names=ROWS)
    assert ours.base_model.call_state.names is None  # nothing left behind for the next call
    theirs = _two_adapters(peft, checkpointing=True, reentrant=reentrant).train()
    with pytest.raises(ValueError, match="training mode"):  # HF PEFT refuses it too (any training forward)
        theirs(input_ids=_ids(), labels=_ids(), adapter_names=ROWS)


@pytest.mark.parametrize("hf_saves", [True, False])
def test_checkpointed_model_runs_mixed_batches_in_eval_and_under_no_grad(tmp_path, hf_saves):
    _two_adapters(peft if hf_saves else fastpeft, checkpointing=False).save_pretrained(str(tmp_path))
    loaded = {}
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        base = make_llama()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model = lib.PeftModel.from_pretrained(base, str(tmp_path))
        model.load_adapter(str(tmp_path / "other"), "other")
        loaded[lib] = model.eval()
    with torch.no_grad():
        want = loaded[peft](input_ids=_ids(), adapter_names=ROWS).logits
        torch.testing.assert_close(loaded[fastpeft](input_ids=_ids(), adapter_names=ROWS).logits, want)
        loaded[fastpeft].train()  # train mode under no_grad: no backward, so no re-run; allowed
        torch.testing.assert_close(loaded[fastpeft](input_ids=_ids(), adapter_names=ROWS).logits, want)

