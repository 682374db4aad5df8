"""HF PEFT's module path `peft.utils.hotswap` (re-exports of fastpeft.hotswap)."""

from ..hotswap import (  # noqa: F401
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
