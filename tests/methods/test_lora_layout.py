"""The shape of methods/lora: LoraConfig imports no feature module, the package's imports have no cycle, and
function-local imports are kept for optional dependencies only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import fastpeft
from fastpeft.methods.lora import subconfig

LORA = Path(fastpeft.__file__).parent / "methods" / "lora"
PACKAGE = "fastpeft.methods.lora"
SRC = str(Path(fastpeft.__file__).parent.parent)

# Import only the config module: the parent packages are stubbed (their __init__ would import every feature),
# so what is loaded is what config.py itself needs.
_ONLY_CONFIG = f"""
import importlib, json, sys, types
for name, path in [("fastpeft", {SRC!r} + "/fastpeft"), ("fastpeft.methods", {SRC!r} + "/fastpeft/methods"),
                   ("fastpeft.methods.lora", {SRC!r} + "/fastpeft/methods/lora")]:
    stub = types.ModuleType(name)
    stub.__path__ = [path]
    sys.modules[name] = stub
importlib.import_module("fastpeft.methods.lora.config")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("fastpeft."))))
"""

# modules of methods/lora the config may load: itself and the registry its features fill
CONFIG_DEPENDENCIES = {f"{PACKAGE}.config", f"{PACKAGE}.subconfig"}

# function-local imports allowed in methods/lora: dependencies that may be missing (transformers < 5 has no
# conversion_mapping)
OPTIONAL = {"transformers"}


def _loaded_by_config() -> set[str]:
    out = subprocess.run([sys.executable, "-c", _ONLY_CONFIG], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_config_imports_no_feature_module():
    loaded = _loaded_by_config()
    methods = {m for m in loaded if m.startswith("fastpeft.methods.") and m != PACKAGE}
    assert methods == CONFIG_DEPENDENCIES, sorted(methods - CONFIG_DEPENDENCIES)


def test_features_register_their_checks():
    expected = {"init_lora_weights", "eva_config", "loftq_config", "corda_config", "lora_ga_config",
                "kasa_config", "velora_config", "arrow_config", "alora_invocation_tokens", "use_bdlora",
                "monteclora_config"}
    assert expected <= set(subconfig.CHECKS)


def _module_name(path: Path) -> str:
    parts = path.relative_to(LORA).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((PACKAGE, *parts))


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _targets(path: Path, node: ast.ImportFrom, modules: set[str]) -> set[str]:
    """The methods/lora modules a `from ... import ...` statement loads."""
    base = _package_of(path)
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    source = f"{base}.{node.module}" if node.module else base
    found = {source} if node.module and source in modules else set()  # `from . import x`: x, not the package
    return found | {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules}


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in LORA.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        imports = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.level]
        graph[name] = set().union(*(_targets(path, node, set(files)) for node in imports))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_lora_modules_import_without_cycles():
    graph = _import_graph()
    assert len(graph) > 30
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_function_local_imports_are_for_optional_dependencies_only():
    found = []
    for path in LORA.rglob("*.py"):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    roots = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {"." if node.level else node.module.split(".")[0]}
                else:
                    continue
                found += [f"{path.relative_to(LORA)}:{node.lineno}" for root in roots if root not in OPTIONAL]
    assert not found, found
