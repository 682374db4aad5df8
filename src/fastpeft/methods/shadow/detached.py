"""`DetachedShadowModel`: the shadow network alone, head(projection(backbone(x))), as a transformers model.

What `ShadowModel.unload_shadow` returns (paper Section 3.5: the shadow network deployed without the base
model). The per-block updates need the base model's outputs, so they are not part of it: this is exactly the
path the auxiliary loss trains (the seed state s0 and the task head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from .backbone import classification_loss, next_token_loss, output_cache, pool_last_token

# keywords generate passes for a causal LM that a bare backbone does not take
_LM_ONLY = ("logits_to_keep", "num_logits_to_keep")


class DetachedShadowModel(PreTrainedModel, GenerationMixin):
    """`backbone` (a transformers base model), `projection` (shadow width -> base width, or identity),
    `head` (the LM head or a classifier; None: the projected hidden states are returned).

    `input_embeddings`: the base model's embedding table when the backbone was fed the base embeddings; kept
    outside the module tree (not re-parented, not in `state_dict()`), so pass `copy=True` to `unload_shadow`
    for a model that saves complete.
    """

    main_input_name = "input_ids"
    base_model_prefix = "backbone"
    _supports_cache_class = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, backbone: PreTrainedModel, projection: nn.Module | None = None,
                 head: nn.Module | None = None, is_classification: bool = False,
                 input_embeddings: nn.Module | None = None) -> None:
        super().__init__(backbone.config)
        self.backbone = backbone
        self.shadow_hidden_projection = projection if projection is not None else nn.Identity()
        self.head = head
        self.is_classification = is_classification
        self._shared_input_embeddings: list[nn.Module | None] = [input_embeddings]  # a list: not a child
        generation = getattr(backbone, "generation_config", None)
        self.generation_config = generation if generation is not None else \
            GenerationConfig.from_model_config(self.config)

    def can_generate(self) -> bool:
        # read defensively: PreTrainedModel.__init__ asks before the attributes exist
        return getattr(self, "head", None) is not None and not getattr(self, "is_classification", False)

    def get_input_embeddings(self):
        shared = self._shared_input_embeddings[0]
        return shared if shared is not None else self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        if self._shared_input_embeddings[0] is not None:
            self._shared_input_embeddings[0] = value
        else:
            self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return None if getattr(self, "is_classification", False) else self.head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        for key in _LM_ONLY:
            kwargs.pop(key, None)
        kwargs["return_dict"] = True
        if self._shared_input_embeddings[0] is not None and kwargs.get("inputs_embeds") is None:
            if input_ids is None:
                raise ValueError("DetachedShadowModel needs input_ids or inputs_embeds.")
            kwargs["inputs_embeds"] = self.get_input_embeddings()(input_ids)
            input_ids = None
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.shadow_hidden_projection(out.last_hidden_state)
        if self.head is None:
            return hidden
        if self.is_classification:
            logits = self.head(pool_last_token(hidden, attention_mask))
            loss = None if labels is None else classification_loss(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        logits = self.head(hidden)
        loss = None if labels is None else next_token_loss(logits, labels)
        result = CausalLMOutputWithPast(loss=loss, logits=logits)
        cache = output_cache(out)
        if cache is not None:
            field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
            result[field] = cache
        return result
