"""The shared core knows no method: checked on the source, so a leak fails here before it spreads.

- The generic modules (core/, checkpoint/, peft_model.py, api.py, tasks.py, registry.py, config.py) import
  nothing from `fastpeft.methods`, at module level or inside a function.
- They name no method and no method-only config field, in identifiers or string literals (docstrings and
  comments are prose about the code, not code, and are not read). Methods reach the core through declarations:
  MethodSpec entries, tuner / prompt class attributes and hooks, config field metadata.
- A method folder imports no other method's folder (shared pieces live in methods/_shared/), except AdaLoRA,
  whose config and model build on LoRA's as in HF PEFT.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import pytest

import fastpeft
from fastpeft.config import PromptLearningConfig
from fastpeft.core.seams import AdapterManager, method_call_keywords
from fastpeft.core.tuner import Tuner
from fastpeft.registry import registered
from fastpeft.types import PeftType

SRC = Path(fastpeft.__file__).resolve().parent
METHODS = SRC / "methods"
GENERIC_FILES = sorted([*(SRC / "core").glob("*.py"), *(SRC / "checkpoint").glob("*.py")]) + [
    SRC / name for name in ("peft_model.py", "api.py", "tasks.py", "registry.py", "config.py")]

# Names of LoRA's variants and initialisations that are not PeftType values but are just as method-specific.
LORA_FEATURES = ("dora", "pissa", "olora", "loftq", "corda", "alora", "kasa", "velora", "monteclora",
                 "bdlora")
# PeftType values that are also English words: only their upper-case spelling (e.g. "MISS") counts as the
# method, so that "a cache miss" in a message does not.
ENGLISH_WORDS = frozenset({"miss", "road", "shadow", "peanut", "cartridge", "deft", "lily"})
# Method-only field names that are also generic names in the core, with the generic meaning there.
GENERIC_NAMES = {
    "adapter_layers": "AdaptionPrompt's field and Tuner.adapter_layers() (the tuner's adapter layers)",
    "hidden_size": "XLoraConfig's field and transformers' model-config key (the base model's width), which "
                   "core/prompt.py reads",
}
# (file, word): unavoidable, each with the reason. Nothing else may name a method or a method-only field.
ALLOWED = {
    ("tasks.py", "task_ids"): "HF PEFT's PeftModelFor*.forward signatures name it; Trainer keeps the dataset "
                              "columns a forward names",
    ("core/prompt.py", "task_ids"): "PromptMethod.encode follows HF PEFT's get_prompt(batch_size, task_ids)",
    ("config.py", "adaptionprompt"): "HF PEFT's public PeftConfig.is_adaption_prompt property",
}
# Method folders that may import another method's folder, because one method is built on another's public
# classes exactly as in HF PEFT (isinstance checks and file layouts depend on it). Helpers are never borrowed:
# shared code lives in methods/_shared/.
DECLARED_METHOD_DEPENDENCIES = {
    ("adalora", "lora"): "AdaLoraConfig subclasses LoraConfig and its model reuses LoRA's model hooks",
    ("lora", "trainable_tokens"): "trainable_token_indices builds TrainableTokens wrappers on the embeddings",
    ("multitask_prompt_tuning", "prompt_tuning"): "MPT's config and embedding subclass prompt tuning's",
    ("xlora", "lora"): "X-LoRA loads its experts into a LoraModel and gives LoRA's Linear / Embedding layers "
                       "its mixing forward (HF PEFT's XLoraModel is built on LoraModel the same way)",
}


def _relative(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _module_name(path: Path) -> str:
    parts = ["fastpeft", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, function-local ones included; for
    `from X import a` both X and X.a (a may be a submodule)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _is_methods(module: str) -> bool:
    return module == "fastpeft.methods" or module.startswith("fastpeft.methods.")


# ------------------------------------------------------------------------------------------ forbidden words
def method_names() -> frozenset[str]:
    """Every PeftType value and method folder name, lower case without underscores, plus LoRA's features."""
    folders = {p.name for p in METHODS.iterdir() if p.is_dir() and p.name[0] != "_"}
    names = {t.value for t in PeftType} | folders
    return frozenset(n.lower().replace("_", "") for n in names) | frozenset(LORA_FEATURES)


def method_only_fields() -> frozenset[str]:
    """Config fields declared by at most two registered methods (a method and one built on it) and named with
    an underscore (compound names are distinctive), less GENERIC_NAMES and the shared base fields; and the
    forward keywords methods declare they read (`call_keywords`, e.g. task_ids)."""
    shared = {f.name for f in dataclasses.fields(PromptLearningConfig)}
    owners = defaultdict(set)
    for peft_type, spec in registered().items():
        for field in dataclasses.fields(spec.config_cls):
            owners[field.name].add(peft_type)
    fields = {name for name, methods in owners.items()
              if len(methods) <= 2 and "_" in name and name not in shared and name not in GENERIC_NAMES}
    return frozenset(fields | method_call_keywords())


_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def forbidden_in(word: str, methods: frozenset[str], fields: frozenset[str]) -> str | None:
    """The method or method-only field `word` (one identifier-like token) names, if any."""
    if word in fields:
        return word
    parts = [p for chunk in word.split("_") for p in _PART.findall(chunk)]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts) + 1):
            joined = "".join(parts[i:j])
            name = joined.lower()
            if name in methods and (name not in ENGLISH_WORDS or joined.isupper()):
                return name
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, owners) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def code_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of the identifiers and non-docstring string literals of `tree`."""
    docs, out = _docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            out.append((node.lineno, node.arg))
        elif isinstance(node, ast.keyword) and node.arg:
            out.append((node.value.lineno, node.arg))
        elif isinstance(node, ast.alias):
            out += [(node.lineno, node.name), (node.lineno, node.asname or "")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append((node.lineno, node.value))
    return out


def named_methods(path: Path, methods: frozenset[str], fields: frozenset[str]) -> list[str]:
    """'file:line: word (in text)' for every method or method-only field that `path`'s code names."""
    found = []
    for line, text in code_texts(ast.parse(path.read_text())):
        for word in re.findall(r"[A-Za-z0-9_]+", text):
            hit = forbidden_in(word, methods, fields)
            if hit is not None and (_relative(path), hit) not in ALLOWED:
                found.append(f"{_relative(path)}:{line}: {hit!r} (in {text[:60]!r})")
    return found


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", GENERIC_FILES, ids=_relative)
def test_generic_modules_import_no_method(path):
    bad = [f"line {line}: {module}" for line, module in imported_modules(path) if _is_methods(module)]
    assert not bad, f"{_relative(path)} imports method code (use a declaration or a hook instead): {bad}"


@pytest.mark.parametrize("path", GENERIC_FILES, ids=_relative)
def test_generic_modules_name_no_method(path):
    found = named_methods(path, method_names(), method_only_fields())
    assert not found, "generic code names a method or a method-only config field:\n" + "\n".join(found)


def test_the_word_lists_are_sane():
    """The forbidden lists hold what they should, not generic words; the matcher sees through spellings."""
    methods, fields = method_names(), method_only_fields()
    assert {"lora", "adalora", "ia3", "prompttuning", "vblora"} <= methods
    assert {"trainable_token_indices", "loftq_config", "lora_bias", "n_frequency", "target_parameters",
            "task_ids", "alora_offsets"} <= fields
    assert not {"target_modules", "modules_to_save", "bias", "r", "scaling", "adapter_layers"} & fields
    for word, hit in [("LoraModel", "lora"), ("AdaLoRA", "adalora"), ("IA3Config", "ia3"), ("PiSSA", "pissa"),
                      ("is_prompt_tuning", "prompttuning"), ("MISS", "miss"), ("miss", None), ("soft", None),
                      ("missing", None), ("evaluate", None), ("lora_scale", "lora")]:
        assert forbidden_in(word, methods, fields) == hit, word


def test_allow_list_entries_are_still_needed():
    methods, fields = method_names(), method_only_fields()
    for (file, word), why in ALLOWED.items():
        texts = code_texts(ast.parse((SRC / file).read_text()))
        hits = {forbidden_in(w, methods, fields) for _, text in texts for w in re.findall(r"\w+", text)}
        assert word in hits, f"ALLOWED[{file!r}, {word!r}] ({why}) no longer applies: remove it"


def method_imports() -> dict[tuple[str, str], list[str]]:
    """{(method folder, other method folder): ['file:line', ...]} for every import across method folders
    (methods/_shared/ counts as a folder that must import none)."""
    found = defaultdict(list)
    for folder in sorted(p for p in METHODS.iterdir() if p.is_dir() and p.name != "__pycache__"):
        for path in sorted(folder.rglob("*.py")):
            for line, module in imported_modules(path):
                parts = module.split(".")
                if _is_methods(module) and len(parts) > 2 and parts[2] not in (folder.name, "_shared"):
                    where = f"{_relative(path)}:{line}"
                    if where not in found[(folder.name, parts[2])]:
                        found[(folder.name, parts[2])].append(where)
    return found


def test_method_folders_import_no_other_method():
    found = method_imports()
    bad = {pair: where for pair, where in found.items() if pair not in DECLARED_METHOD_DEPENDENCIES}
    assert not bad, f"method folders importing another method's folder (move shared code to _shared/): {bad}"
    gone = sorted(set(DECLARED_METHOD_DEPENDENCIES) - set(found))
    assert not gone, f"DECLARED_METHOD_DEPENDENCIES {gone} no longer occur: remove them from the list"


@pytest.mark.parametrize("path", sorted((SRC / "quant").glob("*.py")), ids=_relative)
def test_quantisation_machinery_imports_no_method(path):
    """quant/ is generic (core/layer.py calls it); the methods import it, never the other way round."""
    assert not [m for _, m in imported_modules(path) if _is_methods(m)]


# ------------------------------------------------------------------------------------------ declared seams
def test_both_adapter_managers_satisfy_the_seam():
    """PeftModel.tuner: a Tuner for layer methods, PromptAdapters for prompt methods; both AdapterManagers."""
    from torch import nn

    from fastpeft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)

        def get_input_embeddings(self):
            return self.embed

    layer = get_peft_model(Tiny(), LoraConfig(target_modules=["proj"]))
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=8,
                                num_transformer_submodules=1, num_attention_heads=1, num_layers=1)
    prompt = PeftModel(Tiny(), config)
    assert isinstance(layer.tuner, Tuner) and isinstance(layer.tuner, AdapterManager)
    assert not isinstance(prompt.tuner, nn.Module) and isinstance(prompt.tuner, AdapterManager)


def test_methods_with_a_bias_option_declare_its_file_keys():
    """A `bias` option trains base biases that the adapter files hold: the method's tuner says which
    (`base_file_keys`), the checkpoint code has no rule of its own."""
    for peft_type, spec in registered().items():
        if "bias" in {f.name for f in dataclasses.fields(spec.config_cls)}:
            assert spec.tuner_cls.base_file_keys is not Tuner.base_file_keys, peft_type


MAX_LINES = 600
PYTHON_FOLDERS = ("src", "tests", "tests_ecosystem", "benchmarks", "examples")


def test_no_python_file_is_longer_than_600_lines():
    root = SRC.parents[1]
    files = [p for folder in PYTHON_FOLDERS for p in sorted((root / folder).rglob("*.py"))]
    assert len(files) > 300, f"found only {len(files)} files under {root}"
    long = {str(p.relative_to(root)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these files (the project keeps files <= {MAX_LINES} lines): {long}"
