"""HF PEFT's module path `peft.tuners.cartridge.utils`: re-exports of fastpeft.methods.cartridge.utils."""

from ...methods.cartridge.utils import (  # noqa: F401
    compose_cartridge_adapters,
    initialize_kv_prefix_from_past_key_values,
    initialize_kv_prefix_from_text,
    prompt_embeddings_from_past_key_values,
)
