"""Prompt methods served as a pre-filled key/value cache: the rows of the encoder are, per virtual token,
a key and a value for every layer and KV head, and the model attends to them as to n earlier tokens.

`KVPrefixPrompt` holds what those methods share: reading the cache layout from the model, building the
transformers `Cache`, the forward and `generate` input rules. A method declares itself one by subclassing it.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ...core.prompt import TOKEN_TYPE_TASKS, PromptMethod, _drop, _extend_mask, cache_argument

logger = logging.getLogger(__name__)


def _new_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # configs without layer-type information
        return DynamicCache()


def build_cache(prefix: torch.Tensor, config, model: nn.Module):
    """(batch, n, 2 * layers * dim) -> a transformers Cache holding each layer's prefix keys and values."""
    batch, n, _ = prefix.shape
    layers, heads = config.num_layers, config.num_attention_heads
    head_dim = config.token_dim // heads
    # feature layout per virtual token: [layer][key|value][head][head_dim]
    kv = prefix.view(batch, n, layers, 2, heads, head_dim).permute(2, 3, 0, 4, 1, 5)  # (L, 2, B, H, n, hd)
    cache = _new_cache(model)
    if config.num_transformer_submodules == 1:
        for layer in range(layers):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache
    from transformers import DynamicCache, EncoderDecoderCache

    # Encoder-decoders: only the decoder's self-attention gets a prefix. HF PEFT fills decoder layer l from
    # stored layer (2 * l) % L (it duplicates the rows, then reads them 4 at a time); adapters trained there
    # depend on that mapping, so it is kept to load them unchanged.
    for layer in range(layers):
        source = (2 * layer) % layers
        cache.update(kv[source, 0], kv[source, 1], layer)
    return EncoderDecoderCache(cache, DynamicCache())


class KVPrefixPrompt(PromptMethod):
    """A prompt method whose encoder yields (1, n, 2 * layers * dim) key/value rows."""

    def rows(self, config) -> int:
        return config.num_virtual_tokens

    def prepare_config(self, config, model):
        config = super().prepare_config(config, model)
        cache_argument(model)  # refuse models that cannot take a KV cache now, not at the first forward
        if (getattr(model, "is_gradient_checkpointing", False)
            or getattr(model, "is_activation_checkpointing", False)):
            raise ValueError(
                f"{_method_name(config)} serves its rows as a key/value cache, which does not work with "
                "gradient checkpointing; disable it on the model.")
        model_cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
        kv_heads = model_cfg.get("num_key_value_heads")
        if kv_heads:  # grouped-query attention: the cache holds kv_heads heads, not num_attention_heads
            head_dim = model_cfg.get("head_dim") or config.token_dim // config.num_attention_heads
            config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads
        return config

    def encode(self, encoder, config, batch_size, task_ids=None):
        rows = torch.arange(config.num_virtual_tokens, device=_device(encoder))[None]
        return self.encoder_output(encoder, config, rows).expand(batch_size, -1, -1)

    def load_kv_rows(self, encoder: nn.Module, config, rows: torch.Tensor) -> None:
        """Write (n, 2 * layers * dim) key/value rows into the encoder (e.g. a real prefill's cache)."""
        encoder.load_prompt_embeddings(rows)

    def transform(self, encoder, config, model, word_embeddings, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("task_ids", None)
        task, n = config.task_type, config.num_virtual_tokens
        reference = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                     else kwargs.get("inputs_embeds"))
        if reference is None:
            raise ValueError("Pass input_ids or inputs_embeds to the model.")
        dtype = getattr(model, "dtype", None) or word_embeddings.weight.dtype
        prefix = self.encode(encoder, config, reference.shape[0]).to(dtype)
        kwargs[cache_argument(model)] = build_cache(prefix, config, model)
        if task == "SEQ_2_SEQ_LM":
            kwargs["decoder_attention_mask"] = _extend_mask(kwargs.get("decoder_attention_mask"), n)
        else:
            kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if task not in TOKEN_TYPE_TASKS:
            _drop(kwargs, "token_type_ids", f"task {task}")
        return {k: v for k, v in kwargs.items() if v is not None}

    def generate(self, encoder, config, model, word_embeddings, kwargs):
        """Generate with the prefix pre-filled in the cache.

        Only the caller's ids go to generate(): its logits processors (forced BOS at the first step, forced
        EOS at max_length, n-gram and repetition rules) and the decoder-start check must see the real
        sequence. The mask is n longer than those ids, which generate() reads as "the cache already holds the
        first n positions", so positions and masks line up with forward().
        """
        kwargs = dict(kwargs)
        kwargs.pop("task_ids", None)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(f"{_method_name(config)} generate needs input_ids.")
        batch, n = input_ids.shape[0], config.num_virtual_tokens
        dtype = getattr(model, "dtype", None) or word_embeddings.weight.dtype
        prefix = self.encode(encoder, config, batch * _generate_copies(model, kwargs)).to(dtype)
        kwargs[cache_argument(model)] = build_cache(prefix, config, model)
        _use_cache(kwargs)
        ids_key, mask_key = _generate_keys(config)
        ids = kwargs.get(ids_key)
        if ids is None:  # encoder-decoder without decoder ids: generate() starts from one decoder start token
            ids = input_ids.new_zeros(batch, 1)
        mask = kwargs.get(mask_key)
        kwargs[mask_key] = _extend_mask(torch.ones_like(ids) if mask is None else mask, n)
        if hasattr(model, "_get_initial_cache_position"):
            _legacy_positions(model, config, kwargs, ids, n)
        return model.generate(**kwargs)


def _method_name(config) -> str:
    return getattr(config.peft_type, "value", config.peft_type)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _legacy_positions(model, config, kwargs, ids: torch.Tensor, n: int) -> None:
    """generate() before transformers 5.2 reads the ids' cache positions from the caller, not from the mask.

    It also hands them to an encoder-decoder's encoder (whose relative positions they would shift), so the
    encoder runs here, without them.
    """
    kwargs["cache_position"] = torch.arange(n, n + ids.shape[1], device=ids.device)
    if config.task_type == "SEQ_2_SEQ_LM" and kwargs.get("encoder_outputs") is None:
        kwargs["encoder_outputs"] = model.get_encoder()(input_ids=kwargs["input_ids"],
                                                        attention_mask=kwargs.get("attention_mask"),
                                                        return_dict=True)


def _use_cache(kwargs: dict) -> None:
    """The prefix lives in the cache: without one, generate() would rerun the whole sequence without it. A
    caller's use_cache=False is overridden (said in the log); a generation_config gets it on a copy."""
    settings = kwargs.get("generation_config")
    if kwargs.get("use_cache") is False or getattr(settings, "use_cache", None) is False:
        logger.warning("Key/value prefixes generate with use_cache=True: the prefix keys / "
                       "values live in the cache.")
    if settings is None:
        kwargs["use_cache"] = True
    else:
        kwargs.pop("use_cache", None)
        kwargs["generation_config"] = copy.deepcopy(settings)
        kwargs["generation_config"].use_cache = True


def _generate_keys(config) -> tuple[str, str]:
    """The ids and mask keys generate() grows: the decoder's for encoder-decoders."""
    if config.task_type == "SEQ_2_SEQ_LM":
        return "decoder_input_ids", "decoder_attention_mask"
    return "input_ids", "attention_mask"


def _generate_copies(model, kwargs) -> int:
    """Rows generate() runs per input row (it repeats each row max(num_beams, num_return_sequences) times)."""
    settings = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams") or getattr(settings, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(settings, "num_return_sequences", 1) or 1
    return max(beams, returned)
