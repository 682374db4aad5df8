"""Helpers of the OFT family's method files (tests/methods/test_oft.py, test_boft.py, test_boft_butterfly.py):
the tolerance check, HF PEFT adapters copied into fastpeft models, two-adapter models, BOFT's square MLP (room
for butterfly factors) and a PyTorch stand-in for HF PEFT's fbd_cuda kernel."""

from __future__ import annotations

import peft
import torch

import fastpeft
from state_helpers import copy_adapter

import models

ATOL = 1e-5


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def copy_hf_into_fastpeft(build_fn, factory, fp_config):
    """An HF model (perturbed) and a fastpeft model with the same adapter tensors (through the state-dict
    API)."""
    hf = build_fn()
    fp = fastpeft.get_peft_model(factory(), fp_config)
    return hf, copy_adapter(peft, hf, fastpeft, fp).eval()


def pair(table, case):
    """`copy_hf_into_fastpeft` for a case of a CaseTable."""
    return copy_hf_into_fastpeft(lambda: table.build(peft, case), lambda: table.base(case),
                                 table.config(fastpeft, case))


def close_states(fp, hf):
    fp_sd, hf_sd = fastpeft.get_peft_model_state_dict(fp), peft.get_peft_model_state_dict(hf)
    assert set(fp_sd) == set(hf_sd)
    for k in hf_sd:
        close(fp_sd[k], hf_sd[k], k)


def two_adapters(table, lib, **other):
    """`table`'s "mlp" adapter and a perturbed second one, 'other', on lin1 and head (`other`: its block
    option)."""
    model = table.build(lib, "mlp")
    model.add_adapter("other", table.config(lib, "mlp", target_modules=["lin1", "head"], **other))
    models.perturb(model, 5, 0.1, wanted=lambda n: ".other" in n)
    return model


def two_adapter_pair(table, **other):
    """HF PEFT and fastpeft models with `two_adapters`, the fastpeft one holding HF PEFT's tensors."""
    hf, fp = two_adapters(table, peft, **other), two_adapters(table, fastpeft, **other)
    copy_adapter(peft, hf, fastpeft, fp, "other")
    return hf, copy_adapter(peft, hf, fastpeft, fp)


# ---------------------------------------------------------------------------------------------- BOFT
def make_square_mlp():
    torch.manual_seed(7)
    return models.MLP(16, 16, 3).eval()


def square_inputs():
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(3))


BOFT_MODELS = {**models.MODELS, "square": (make_square_mlp, square_inputs)}


class BlockDiagKernel:
    """What HF's fbd_cuda extension computes: a block-diagonal matrix per butterfly factor (and its
    gradient)."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        size = blocks.shape[-1]
        parts = [grad[:, i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(blocks.shape[1])]
        return [torch.stack(parts, dim=1)]
