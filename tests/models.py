"""Tiny, deterministic model factories shared by the test-suite.

Every factory seeds torch's global RNG before building, so calling a factory twice returns two
independent modules with bit-identical weights. Each factory has a matching ``*_inputs`` function
returning example inputs (also seeded). ``MODELS`` maps a short name to ``(factory, inputs_fn)``.

Nothing here touches the network: the transformers models are built from hand-written configs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

SEED = 1234


def _seeded(seed: int = SEED) -> torch.Generator:
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------------------------
# plain torch models
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, n_in: int = 10, hidden: int = 20, n_out: int = 2):
        super().__init__()
        self.lin0 = nn.Linear(n_in, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        x = self.act(self.lin0(x))
        x = self.act(self.lin1(x))
        return self.head(x)


class EmbModel(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, 6)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


class GPT2StyleConv1DModel(nn.Module):
    """Uses transformers' Conv1D (weight stored as (in, out)), like GPT-2's c_attn / c_proj."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(24, 10)  # nf=out, nx=in
        self.act = nn.GELU()
        self.c_proj = Conv1D(10, 24)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.c_proj(self.act(self.c_fc(x))))


class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv1d(4, 8, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.conv1 = nn.Conv1d(8, 6, kernel_size=3, stride=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.act(self.conv0(x))
        x = self.act(self.conv1(x))
        return self.head(x.mean(dim=-1))


class Conv2dModel(nn.Module):
    """Includes a grouped convolution (groups=2)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 8, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.gconv = nn.Conv2d(8, 8, kernel_size=3, groups=2, padding=1)
        self.conv1 = nn.Conv2d(8, 6, kernel_size=(1, 3), stride=(1, 2))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.act(self.conv0(x))
        x = self.act(self.gconv(x))
        x = self.act(self.conv1(x))
        return self.head(x.mean(dim=(-1, -2)))


class Conv3dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv3d(2, 4, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.conv1 = nn.Conv3d(4, 4, kernel_size=2, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.conv0(x))
        x = self.act(self.conv1(x))
        return self.head(x.mean(dim=(-1, -2, -3)))


class MHAModel(nn.Module):
    def __init__(self, embed_dim: int = 16, num_heads: int = 2):
        super().__init__()
        self.mha = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.lin = nn.Linear(embed_dim, 4)

    def forward(self, x):
        attn, _ = self.mha(x, x, x, need_weights=False)
        return self.lin(attn)


def make_mlp():
    _seeded()
    return MLP().eval()


def mlp_inputs():
    g = _seeded(1)
    return torch.randn(3, 10, generator=g)


def make_emb():
    _seeded()
    return EmbModel().eval()


def emb_inputs():
    g = _seeded(2)
    return torch.randint(0, 50, (2, 7), generator=g)


def make_conv1d_gpt2():
    _seeded()
    m = GPT2StyleConv1DModel()
    # transformers' Conv1D initialises bias to zero; give it some signal so bias handling matters
    with torch.no_grad():
        for mod in (m.c_fc, m.c_proj):
            mod.bias.normal_(0, 0.1)
    return m.eval()


def conv1d_gpt2_inputs():
    g = _seeded(3)
    return torch.randn(2, 5, 10, generator=g)


def make_conv1d():
    _seeded()
    return Conv1dModel().eval()


def conv1d_inputs():
    g = _seeded(4)
    return torch.randn(2, 4, 16, generator=g)


def make_conv2d():
    _seeded()
    return Conv2dModel().eval()


def conv2d_inputs():
    g = _seeded(5)
    return torch.randn(2, 4, 8, 8, generator=g)


def make_conv3d():
    _seeded()
    return Conv3dModel().eval()


def conv3d_inputs():
    g = _seeded(6)
    return torch.randn(2, 2, 6, 6, 6, generator=g)


def make_mha():
    _seeded()
    return MHAModel().eval()


def mha_inputs():
    g = _seeded(7)
    return torch.randn(2, 5, 16, generator=g)


class TaskMLP(MLP):
    """MLP over (batch, tokens, features) whose forward accepts (and ignores) task_ids, for Poly's contract
    rows."""

    def forward(self, x, task_ids=None):
        return super().forward(x)


def make_mlp_tasks():
    _seeded()
    return TaskMLP().eval()


def mlp_tasks_inputs():
    g = _seeded(8)
    return {"x": torch.randn(3, 4, 10, generator=g), "task_ids": torch.tensor([0, 2, 1])}


# ----------------------------------------------------------------------------------------------
# tiny transformers models (from configs, offline)
# ----------------------------------------------------------------------------------------------


def _token_inputs(seed: int, vocab: int, batch: int = 2, seq: int = 6, pad_last: bool = True):
    g = _seeded(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last and batch > 1:
        mask[-1, -2:] = 0  # right padding on the last row
    return ids, mask


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    _seeded()
    return LlamaForCausalLM(cfg).eval()


def llama_inputs():
    ids, mask = _token_inputs(10, 100)
    return {"input_ids": ids, "attention_mask": mask}


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=100,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation="eager",
    )
    _seeded()
    return GPT2LMHeadModel(cfg).eval()


def gpt2_inputs():
    ids, mask = _token_inputs(11, 100)
    return {"input_ids": ids, "attention_mask": mask}


def make_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    _seeded()
    return T5ForConditionalGeneration(cfg).eval()


def t5_inputs():
    ids, mask = _token_inputs(12, 100)
    g = _seeded(13)
    dec = torch.randint(0, 100, (2, 4), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


def make_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        attn_implementation="eager",
    )
    _seeded()
    return BertForSequenceClassification(cfg).eval()


def bert_cls_inputs():
    ids, mask = _token_inputs(14, 100)
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

MODELS = {
    "mlp": (make_mlp, mlp_inputs),
    "emb": (make_emb, emb_inputs),
    "conv1d_gpt2": (make_conv1d_gpt2, conv1d_gpt2_inputs),
    "conv1d": (make_conv1d, conv1d_inputs),
    "conv2d": (make_conv2d, conv2d_inputs),
    "conv3d": (make_conv3d, conv3d_inputs),
    "mha": (make_mha, mha_inputs),
    "mlp_tasks": (make_mlp_tasks, mlp_tasks_inputs),
    "llama": (make_llama, llama_inputs),
    "gpt2": (make_gpt2, gpt2_inputs),
    "t5": (make_t5, t5_inputs),
    "bert_cls": (make_bert_cls, bert_cls_inputs),
}


def perturb(model, seed: int = 0, scale: float = 0.3, wanted=None):
    """Move every trainable tensor (or, given `wanted`, every one whose name it accepts) off its init by
    seeded noise, in sorted name order, so two libraries with the same parameter names get the same values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if (p.requires_grad if wanted is None else wanted(name)):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def assert_merge_roundtrip(model, inputs, expected, close, safe_merge: bool = False) -> None:
    """Merging keeps the outputs (`close(actual, expected, what)`), unmerging restores every base weight."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.base_model.merge_adapter(safe_merge=safe_merge)
    close(forward(model, inputs), expected, "merged")
    model.base_model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            close(p, weights[n], f"restored {n}")


def forward(model, inputs) -> torch.Tensor:
    """Run ``model`` on ``inputs`` (a tensor or a kwargs dict) without grad; return a float tensor."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"don't know how to get a tensor out of {type(out)}")


def count_calls(monkeypatch, module, name: str) -> dict:
    """Wrap `module.name` so that the real function still runs and {"n": calls} counts it (a test can tell
    which path ran)."""
    counter = {"n": 0}
    original = getattr(module, name)

    def counting(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return counter
