"""Small pieces several layer methods share: config checks, default targets, layout fixes and bias training.

Nothing here knows a method by name: each caller passes its own label, table, layer test or option value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from torch import nn

from ...core import targeting
from ...core.layer import AdapterLayer
from ...integrations.transformers_defaults import default_targets
from .modules import is_conv1d

logger = logging.getLogger(__name__)

# parameter-name parts of modules_to_save wrappers (their copies and the original they stand in for)
WRAPPER_PARTS = (".modules_to_save.", ".original_module.")


# ------------------------------------------------------------------ config checks (called from __post_init__)
def lists_to_sets(config, names: Iterable[str] = ("target_modules", "exclude_modules"),
                  kinds: tuple[type, ...] = (list,)) -> None:
    """Name lists become sets, as HF PEFT stores them (a regex string stays as it is)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, kinds):
            setattr(config, name, set(value))


def check_positive_ints(config, owner: str, names: Iterable[str]) -> None:
    """Each option in `names` must be an int > 0 (a bool is refused, though Python counts it as an int)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}.")


def check_choice(owner: str, option: str, value, allowed: Iterable) -> None:
    """`value` of `owner`.`option` must be one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{owner}.{option} must be one of {list(allowed)}, got {value!r}.")


def check_layer_selection(config, owner: str, regex_targets: bool = False) -> None:
    """layers_pattern only names where the indices of layers_to_transform are read; with `regex_targets`
    neither option may be combined with a regex string target_modules (they select among a list of names)."""
    if regex_targets and isinstance(config.target_modules, str):
        for option in ("layers_to_transform", "layers_pattern"):
            if getattr(config, option) is not None:
                raise ValueError(f"{owner}: {option} cannot be used when target_modules is a regex string; "
                                 "give target_modules as a list of names.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{owner}: layers_pattern needs layers_to_transform (which layer indices to adapt).")



BIAS_HELP = "'none', 'all' (every bias of the model) or '<method>_only' (biases of the adapted layers)"


def check_layer_options(config, owner: str) -> None:
    """Target lists become sets, layer selection is checked (no regex target with it), and `bias` is 'none',
    'all' or '<method>_only' (the prefix is left free, as HF PEFT only tests the suffix)."""
    lists_to_sets(config)
    check_layer_selection(config, owner, regex_targets=True)
    if not isinstance(config.bias, str) or not (config.bias in ("none", "all")
                                                or config.bias.endswith("_only")):
        raise ValueError(f"{owner}.bias={config.bias!r} is not valid; use {BIAS_HELP}.")


def check_block_choice(owner: str, count_name: str, count: int, size_name: str, size: int) -> None:
    """Exactly one of the block count and the block size is given (non-zero); the other is derived per
    layer."""
    if count < 0 or size < 0:
        raise ValueError(f"{owner}: {count_name}={count} and {size_name}={size} must not be negative.")
    if (count != 0) == (size != 0):
        raise ValueError(
            f"{owner}: set exactly one of {count_name} ({count}) and {size_name} ({size}) to a non-zero "
            f"value and the other to 0, since {count_name} x {size_name} equals the layer's input size."
        )

# ------------------------------------------------------------------ tuner helpers
def is_nn_linear(module: nn.Module) -> bool:
    """'all-linear' test of methods that adapt torch's nn.Linear only (not transformers' Conv1D)."""
    return isinstance(module, nn.Linear)


def fill_targets(config, model: nn.Module, table: dict[str, list[str] | str], label: str,
                 is_linear: Callable[[nn.Module], bool] | None = None):
    """target_modules=None: the model type's row of `table` (a regex row stays a regex); with `is_linear`,
    'all-linear' is expanded to the names of the modules it accepts (the output head left out)."""
    if config.target_modules is None:
        config.target_modules = default_targets(table, model, label)
    elif (is_linear is not None and isinstance(config.target_modules, str)
          and config.target_modules.lower() == targeting.ALL_LINEAR):
        config.target_modules = targeting.all_linear_targets(model, config.task_type, is_linear)
    return config


def pattern_value(patterns: dict | None, key: str, default):
    """HF PEFT's per-module lookup in a `<option>_pattern` dict: the first pattern matching `key` as a dotted
    suffix, else `key` itself as an entry, else `default`."""
    patterns = patterns or {}
    chosen = next((p for p in patterns if re.match(rf".*\.{p}$", key)), key)
    return patterns.get(chosen, default)


def linear_targets_checked(targets: list, check: Callable[[nn.Module, str], None]) -> list:
    """Calls `check(base, name)` on the nn.Linear base layer of each (name, module) target (a target already
    adapted is checked through its base layer); returns `targets`."""
    for name, module in targets:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear):
            check(base, name)
    return targets


def fill_targets_fan_out_off(config, model: nn.Module, table: dict[str, list[str]], label: str,
                             is_linear: Callable[[nn.Module], bool], warning: str,
                             log: logging.Logger = logger):
    """`fill_targets`, then, for methods whose layers hold nn.Linear weights (stored (out, in)),
    fan_in_fan_out=True turned off with `warning` logged on `log`."""
    fill_targets(config, model, table, label, is_linear)
    if config.fan_in_fan_out:
        log.warning(warning)
        config.fan_in_fan_out = False
    return config


def align_fan_in_fan_out(config, module: nn.Module, key: str) -> bool:
    """transformers' Conv1D stores its weight (in, out), nn.Linear (out, in): the config's fan_in_fan_out
    follows the layer type of each target (corrected with a warning, as HF PEFT). Returns the value for
    `module`."""
    wanted = is_conv1d(module)
    if bool(config.fan_in_fan_out) != wanted:
        logger.warning("'%s' is %s: setting fan_in_fan_out=%s.", key,
                       "a Conv1D (weight stored (in, out))" if wanted else "an nn.Linear", wanted)
        config.fan_in_fan_out = wanted
    return wanted


def refuse_second_bias_adapter(peft_config: dict, config, label: str) -> None:
    """Only one adapter per model may train base biases (bias other than 'none'), as HF PEFT."""
    others = [n for n, c in peft_config.items() if c is not config and c.bias != "none"]
    if others and config.bias != "none":
        raise ValueError(
            f"Only one {label} adapter per model may train biases, and adapter '{others[0]}' already does "
            f"(bias={peft_config[others[0]].bias!r}): set bias='none' for the new adapter.")


def bias_file_keys(model: nn.Module, adapter_name: str, config, modules: list[tuple[str, nn.Module]]
                   ) -> list[tuple[str, str]]:
    """A tuner's `base_file_keys` for a `bias` option: (file key, model key) of the base biases it trains.

    "all" follows HF PEFT's file layout: every bias under its own name, including the frozen
    `original_module` ones and, a second time, a modules_to_save copy's bias as
    `<module>.modules_to_save.bias`.
    """
    bias, pairs = getattr(config, "bias", "none"), []
    if bias == "all":
        copy_marker = f".modules_to_save.{adapter_name}."
        for name, _ in model.named_parameters():
            if name.rsplit(".", 1)[-1] != "bias":
                continue
            if copy_marker in name:
                pairs.append((name.replace(copy_marker, ".modules_to_save."), name))
            elif ".modules_to_save." not in name:
                pairs.append((name, name))
    elif isinstance(bias, str) and bias.endswith("_only"):  # lora_only, vblora_only, fourier_only, ...
        for prefix, module in modules:
            if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names():
                if getattr(module.get_base_layer(), "bias", None) is not None:
                    key = f"{prefix}.base_layer.bias" if prefix else "base_layer.bias"
                    pairs.append((key, key))
    return pairs


def train_base_biases(tuner, adapter_name: str, bias: str, skip: tuple[str, ...] = WRAPPER_PARTS) -> None:
    """bias='all': every bias of the model trains (names containing a part of `skip` excepted);
    '<method>_only': the base biases of the layers holding `adapter_name`; 'none': nothing."""
    if bias == "all":
        for name, param in tuner.model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and not any(part in name for part in skip):
                param.requires_grad_(True)
    elif bias.endswith("_only"):
        for layer in tuner.adapter_layers():
            base_bias = getattr(layer.get_base_layer(), "bias", None)
            if adapter_name in layer.adapter_names() and base_bias is not None:
                base_bias.requires_grad_(True)
