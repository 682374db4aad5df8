"""Method names and method options for ``fastpeft train``, built generically from the registry.

Every init field of the method's config dataclass (except the shared ``PeftConfig`` ones) becomes a flag
(``lora_alpha`` -> ``--lora-alpha``); its type annotation decides how the text is parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from .common import CliError

DEFAULT_METHOD = "lora"
_NAME_ONLY = re.compile(r"^[\w.]+$")


def _registry():
    from fastpeft.registry import registered

    return registered()


def known_methods() -> list[str]:
    """CLI spellings (lower case) of every registered method."""
    return sorted(t.value.lower() for t in _registry())


def resolve_method(name: str):
    """The registry's ``MethodSpec`` for ``name`` (``lora``, ``prompt-tuning``, ``PROMPT_TUNING``...)."""
    key = name.strip().upper().replace("-", "_")
    for peft_type, spec in _registry().items():
        if peft_type.value == key:
            return spec
    raise CliError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")


def method_fields(config_cls) -> list[dataclasses.Field]:
    """The config fields a user may set: init fields the shared ``PeftConfig`` base does not define."""
    from fastpeft.config import PeftConfig

    shared = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f for f in dataclasses.fields(config_cls) if f.init and f.name not in shared]


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _scalar(annotation: str):
    """Parser for one value of a field annotated ``annotation`` (a string: configs use postponed
    annotations)."""
    alternatives = {a.strip() for a in annotation.split("|")} - {"None"}
    if alternatives <= {"int"} or alternatives == {"list[int]", "int"} or "list[int]" in alternatives:
        return int
    if alternatives == {"float"}:
        return float
    if alternatives <= {"dict", "list"} or (alternatives and all(a.startswith("dict") for a in alternatives)):
        return _json_value
    if "bool" in alternatives:
        return _bool_or_text
    return str


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({exc.msg})") from None


def _bool_or_text(text: str):
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    return text


def _choices(annotation: str) -> list[str] | None:
    match = re.search(r"Literal\[([^\]]*)\]", annotation)
    return [c.strip().strip("'\"") for c in match.group(1).split(",")] if match else None


def _is_list(annotation: str) -> bool:
    return "list[" in annotation or annotation.split("|")[0].strip() == "list"


def _help(field: dataclasses.Field) -> str:
    """The field's help text plus its default (argparse's ``%`` formatting escaped)."""
    text = field.metadata.get("help", "")
    if field.default is not dataclasses.MISSING and field.default is not None:
        text += f" (default: {getattr(field.default, 'value', field.default)})"
    return text.replace("%", "%%")


def add_method_flags(parser: argparse.ArgumentParser, config_cls, taken: set[str]) -> list[str]:
    """Add one flag per settable field of ``config_cls``; returns the field names added."""
    added = []
    for field in method_fields(config_cls):
        flag = flag_name(field.name)
        if flag in taken:
            continue
        annotation = str(field.type)
        kind = _scalar(annotation)
        kwargs: dict[str, Any] = {"dest": f"method__{field.name}", "default": argparse.SUPPRESS,
                                  "help": _help(field), "type": kind,
                                  "metavar": "JSON" if kind is _json_value else field.name.upper()}
        if annotation.replace(" ", "") == "bool":
            kwargs = {k: v for k, v in kwargs.items() if k not in ("type", "metavar")}
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(annotation) and kind is not _json_value:
            kwargs["nargs"] = "+"
        kwargs["choices"] = _choices(annotation)
        if kwargs["choices"]:
            kwargs.pop("metavar", None)
        parser.add_argument(flag, **kwargs)
        added.append(field.name)
    return added


def _normalise(field: dataclasses.Field, value: Any) -> Any:
    """A one-item list for a list-or-string field stays a list for plain names, else becomes the string."""
    annotation = str(field.type)
    if isinstance(value, list) and len(value) == 1 and "str" in annotation.replace("list[str]", ""):
        item = value[0]
        if isinstance(item, str) and not _NAME_ONLY.match(item):
            return item  # a regex or a keyword such as "all-linear"
    return value


def flag_values(args: argparse.Namespace, config_cls) -> dict[str, Any]:
    """Method options given on the command line, keyed by config field name."""
    fields = {f.name: f for f in method_fields(config_cls)}
    found = {k[len("method__"):]: v for k, v in vars(args).items() if k.startswith("method__")}
    return {k: _normalise(fields[k], v) for k, v in found.items() if k in fields}


def read_config_file(path: str | None) -> dict[str, Any]:
    """Options from a YAML or JSON file (a mapping of config field names to values)."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise CliError(f"--config file {path!r} not found")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types
        raise CliError(f"--config file {path!r} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"--config file {path!r} must hold a mapping of option names to values")
    return data


def build_method_config(spec, file_options: dict[str, Any], flags: dict[str, Any], task_type: str):
    """The method's config from the file's options overridden by flags; unknown names are refused."""
    allowed = {f.name for f in method_fields(spec.config_cls)}
    file_type = file_options.pop("peft_type", None)
    if file_type is not None and str(file_type).upper() != spec.peft_type.value:
        raise CliError(f"--config is for peft_type {file_type!r} but --method is "
                       f"{spec.peft_type.value.lower()}")
    file_options.pop("task_type", None)
    unknown = sorted(set(file_options) - allowed)
    if unknown:
        raise CliError(f"--config options {unknown} are not fields of {spec.config_cls.__name__} "
                       f"(known: {', '.join(sorted(allowed))})")
    options = {**file_options, **flags}
    try:
        return spec.config_cls(task_type=task_type, **options)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid {spec.peft_type.value.lower()} options: {exc}") from None
