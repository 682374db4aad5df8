"""Tiny models quantised with real bitsandbytes (CPU), for the QLoRA tests of the other methods and LoftQ.

bitsandbytes 0.50.2's CPU kernel dequantises 4-bit weights block by block along each row while quantisation
runs over the flattened weight; the two agree only when a row's length is a multiple of the block size (64).
Every layer quantised here therefore has in_features in {64, 128}, so the quantised layers compute with
genuine NF4 weights.
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 4321
HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 100


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32, attn_implementation="eager", tie_word_embeddings=False)


def make_llama():
    """A float32 tiny Llama with seeded weights (bit-identical on every call)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(llama_config()).eval()


def save_llama(folder) -> str:
    """Save the tiny Llama (model.safetensors + config.json) into `folder`; returns the folder as a string."""
    make_llama().save_pretrained(folder)
    return str(folder)


def load_quantised(folder, bits: int) -> nn.Module:
    """The saved tiny Llama loaded by transformers with bitsandbytes: NF4 (float32 compute) or LLM.int8()."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quant, device_map="cpu",
                                                 dtype=torch.float32)
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch or inputs())).logits


class MLP64(nn.Module):
    """Plain float layers whose inputs are 64 / 128 wide (LoftQ on real bitsandbytes, see the module doc)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(SEED)
        self.lin0 = nn.Linear(64, 128)
        self.lin1 = nn.Linear(128, 48)
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp64_inputs() -> torch.Tensor:
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(SEED))


# ---------------------------------------------------------------------------------------------- HF on the CPU
def _on_cpu(device):
    if isinstance(device, str) and device.split(":")[0] in ("cuda", "xpu"):
        return "cpu"
    if isinstance(device, torch.device) and device.type in ("cuda", "xpu"):
        return torch.device("cpu")
    return device


def keep_device_moves_on_cpu(monkeypatch) -> None:
    """HF PEFT's LoftQ code moves tensors to "cuda" / "xpu" for its SVD: turn those `Tensor.to` moves into CPU
    ones for the test (tests/methods/test_loftq.py, tests/methods/test_loftq_bnb.py)."""
    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple(_on_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
