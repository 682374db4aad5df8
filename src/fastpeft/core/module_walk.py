"""Walks over a model's module tree for the whole-model steps of an injection or a load.

With many adapters loaded most modules of a model are per-adapter leaves: LoRA adds three per target and
adapter (`lora_A.<name>`, `lora_B.<name>`, `lora_dropout.<name>`), so 100 adapters on 44 targets make ~13k
modules around a base of ~300. torch's `named_modules()` costs ~2 us per module through its nested generators;
a load that walks the tree ten times spends most of its time there. These walks read `_modules` directly and
can leave out the per-adapter entries of adapter layers (the nn.ModuleDict children of an `AdapterLayer`,
keyed by adapter name: the same rule `AdapterLayer.delete_adapter` uses), which nothing but that adapter's own
steps needs.
"""

from __future__ import annotations

from torch import nn

from .layer import AdapterLayer

EVERY = object()  # `adapter=EVERY`: every per-adapter entry is walked (torch's own walk)


def per_adapter_dicts(module: nn.Module) -> list[nn.ModuleDict]:
    """The per-adapter entries' dicts of `module`: its nn.ModuleDict children if it is an adapter layer."""
    if not isinstance(module, AdapterLayer):
        return []
    return [child for child in module._modules.values() if isinstance(child, nn.ModuleDict)]


def all_modules(root: nn.Module) -> list[nn.Module]:
    """Every module under `root` (itself included) once, in no particular order."""
    out = [root]
    seen = {id(root)}
    i = 0
    while i < len(out):
        for child in out[i]._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
        i += 1
    return out


def named_modules(root: nn.Module, adapter=EVERY,
                  remove_duplicate: bool = True) -> list[tuple[str, nn.Module]]:
    """`root.named_modules(remove_duplicate=...)` as a list, same names and order; with `adapter` set (an
    adapter name, or None for none) the per-adapter entries of adapter layers are walked only for that
    adapter."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    prune = adapter is not EVERY

    def visit(prefix: str, module: nn.Module, only=EVERY) -> None:
        if remove_duplicate:
            if id(module) in seen:
                return
            seen.add(id(module))
        out.append((prefix, module))
        dicts = {id(d) for d in per_adapter_dicts(module)} if prune else ()
        for key, child in module._modules.items():
            if child is None or (only is not EVERY and key != only):
                continue
            visit(f"{prefix}.{key}" if prefix else key, child, adapter if id(child) in dicts else EVERY)

    visit("", root)
    return out


def to_eval(model: nn.Module) -> None:
    """`model.eval()` (as HF PEFT after a load), skipped when no module is in training mode: after a load
    into a model in eval mode none is (new adapter modules take their base layer's mode), and the recursive
    `train(False)` over ~13k modules costs more than this check."""
    if any(module.training for module in all_modules(model)):
        model.eval()


def own_parameters(modules) -> list[nn.Parameter]:
    """The parameters held by `modules` (each module's own, a shared one once)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out.append(param)
    return out
