"""`PeftConfig` and `PromptLearningConfig`: the dataclasses behind `adapter_config.json`.

They read and write the same JSON as HF PEFT; keys written by newer versions are ignored with a logged note.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .checkpoint import io, validate
from .checkpoint.config_values import check_file_config
from .types import PeftType, TaskType

logger = logging.getLogger(__name__)

# The file-format version written into `peft_version`: fastpeft writes HF PEFT 0.21.2's layout.
COMPAT_PEFT_VERSION = "0.21.2"
_PEFT_TYPES = frozenset(t.value for t in PeftType)

# What shared code needs to know about a config field is declared on the field (dataclass metadata), so
# that it keeps no list of method field names:
# - "size": the field sizes tensors or loop counts, so a file's value is bounded before anything is allocated
#   (checkpoint/config_values.py). One of SIZE_KINDS: "dim", an int at most the base model's largest weight
#   dimension; "matrix", an int at most the element count of its largest weight; "dim_values", a dict of "dim"
#   ints (module -> rank); "token_ids", embedding rows (a list, or a dict of lists) whose ids and number stay
#   below the largest dimension. An adapter with a "token_ids" field set trains those rows: its files hold
#   them, never whole embedding tables (`trains_token_rows`, checkpoint/keys.py).
# - "keys": "modules": a dict keyed by module-name regexes, each of which must match a target
#   (`module_pattern_fields`, core/target_checks.py).
# - "targets": "parameters": the field selects targets by parameter name; while it is set, pattern keys may
#   name parameters and are not checked against module names.
# - "load_kwarg": True: PeftModel.from_pretrained(..., <field>=value) replaces the saved value (a value only
#   the caller knows at load time, e.g. where the folders a config names have moved).
SIZE_KINDS = ("dim", "matrix", "dim_values", "token_ids")


def declared(config: PeftConfig | type, key: str) -> dict[str, Any]:
    """{field name: metadata[key]} of the fields of `config` (a config or config class) that declare `key`."""
    return {f.name: f.metadata[key] for f in dataclasses.fields(config) if key in f.metadata}


@dataclass
class PeftConfig:
    """Fields shared by every adapter method (same names and defaults as HF PEFT)."""

    task_type: str | TaskType | None = field(default=None, metadata={"help": "The model head, see TaskType."})
    peft_type: str | PeftType | None = field(default=None, metadata={"help": "The adapter method."})
    auto_mapping: dict | None = field(default=None,
                                      metadata={"help": "Base class to rebuild a custom model."})
    peft_version: str | None = field(default=None, metadata={"help": "File-format version, filled on save."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "The base model."})
    revision: str | None = field(default=None, metadata={"help": "The base model's revision."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the adapter (no training)."})

    # the method's PeftType value, set on a method's config class by `registry.register` from its MethodSpec,
    # so that a method states its type in one place; None on the generic base classes
    PEFT_TYPE: ClassVar[str | None] = None

    def __setattr__(self, name: str, value: Any) -> None:
        # as HF PEFT: `peft_type` is a PeftType member (transformers reads `config.peft_type.value`), whether
        # a method's config sets it or a file gives the string
        if (name == "peft_type" and isinstance(value, str) and not isinstance(value, PeftType)
            and value in _PEFT_TYPES):
            value = PeftType(value)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        # wins over a passed value (from_dict refuses another type's file)
        if type(self).PEFT_TYPE is not None:
            self.peft_type = type(self).PEFT_TYPE
        if self.task_type is not None and self.task_type not in {t.value for t in TaskType}:
            raise ValueError(
                f"Invalid task_type {self.task_type!r}; use one of: {', '.join(t.value for t in TaskType)}."
            )
        if self.peft_version is None:
            self.peft_version = COMPAT_PEFT_VERSION

    # ------------------------------------------------------------------ properties
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    @property
    def rewrites_base_weights(self) -> bool:
        """Whether injection changes the base model's weights or modules (e.g. LoRA's PiSSA init): loading
        then backs the base weights up, and no base-model fingerprint is saved. Methods that do override
        this."""
        return False

    @property
    def trains_token_rows(self) -> bool:
        """Whether the adapter trains single embedding rows (a "token_ids" field is set, see SIZE_KINDS)."""
        fields = declared(self, "size")
        return any(getattr(self, name) is not None for name, kind in fields.items() if kind == "token_ids")

    @property
    def module_pattern_fields(self) -> tuple[str, ...]:
        """The fields keyed by module-name regexes (declared "keys": "modules") whose keys must each match a
        targeted module; none while a field declared "targets": "parameters" is set. Methods whose keys mean
        something else override this."""
        if any(getattr(self, name) for name in declared(self, "targets")):
            return ()
        return tuple(name for name, keys in declared(self, "keys").items() if keys == "modules")

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """`to_dict()` made JSON-safe: sets become lists, enums their values."""
        return {k: _jsonable(v) for k, v in self.to_dict().items()}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `adapter_config.json` into `save_directory` (atomically)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder.")
        data = self.to_json_dict()
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        io.write_json(os.path.join(save_directory, io.CONFIG_NAME), data)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Build the config class registered for `kwargs['peft_type']`."""
        from .registry import get_spec

        if "peft_type" not in kwargs:
            raise ValueError("The config has no 'peft_type'; it is not an adapter config.")
        config_cls = get_spec(kwargs["peft_type"]).config_cls
        return config_cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build from a dict, ignoring (and logging) keys this version does not know."""
        if cls in (PeftConfig, PromptLearningConfig):
            return cls.from_peft_type(**data)
        declared = cls.PEFT_TYPE
        found = _jsonable(data.get("peft_type"))
        if declared is not None and found not in (None, declared):
            raise ValueError(
                f"This config is for peft_type {found!r}, not {declared!r}; load it with "
                f"PeftConfig.from_pretrained or the matching config class instead of {cls.__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(
                "Ignoring config keys %s unknown to fastpeft's %s (probably written by a newer version).",
                unknown, cls.__name__,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str) -> dict[str, Any]:
        return validate.read_config_json(path)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load `adapter_config.json` from a folder or Hub repo id; extra kwargs override its fields."""
        hub_kwargs, overrides = io.split_hub_kwargs(kwargs)
        validate.check_subfolder(subfolder)
        path = io.resolve_file(pretrained_model_name_or_path, io.CONFIG_NAME,
                               subfolder=subfolder, **hub_kwargs)
        if path is None:
            raise io.AdapterFileNotFoundError(
                f"Can't find '{io.CONFIG_NAME}' at '{io.where(pretrained_model_name_or_path, subfolder)}'. "
                "Pass a folder written by save_pretrained (fastpeft or HF PEFT) or a Hub "
                "repo id of an adapter."
            )
        data = {**validate.read_config_json(path), **overrides}
        with validate.file_errors(path):  # a malformed file raises AdapterConfigError naming it, nothing else
            check_file_config(cls, data, path)
            return cls.from_dict(data)

    @classmethod
    def given_or_saved(cls, config: Any, model_id: str | os.PathLike, **hub_kwargs: Any) -> PeftConfig:
        """`config` as the caller passed it to a `from_pretrained`, else the one saved at `model_id`.
        Anything but a config object is refused with a ValueError (HF PEFT's type for it)."""
        if config is None:
            return cls.from_pretrained(model_id, **hub_kwargs)
        from .registry import is_method_config

        if not is_method_config(config):
            raise ValueError(
                f"config must be a PeftConfig (a method's config, or PeftConfig.from_pretrained(path)), "
                f"got {type(config).__name__}; or leave config=None to use the adapter_config.json at "
                f"{model_id!r}.")
        return config


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    if isinstance(value, (PeftType, TaskType)):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class PromptLearningConfig(PeftConfig):
    """Shared fields of the soft-prompt methods (prompt, prefix, p-tuning)."""

    num_virtual_tokens: int = field(default=None, metadata={
        "help": "Number of virtual tokens.", "size": "dim"})
    token_dim: int = field(default=None, metadata={"help": "Hidden size of the base model.", "size": "dim"})
    num_transformer_submodules: int | None = field(default=None, metadata={
        "help": "1 (decoder) or 2 (enc-dec).", "size": "dim"})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "Attention heads of the base.", "size": "dim"})
    num_layers: int | None = field(default=None, metadata={
        "help": "Layers of the base model.", "size": "dim"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules."})

    @property
    def is_prompt_learning(self) -> bool:
        return True
