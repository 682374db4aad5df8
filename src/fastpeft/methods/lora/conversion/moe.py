"""LoRA adapters trained on transformers v4 MoE models, used on the v5 versions of those models.

transformers v5 stores the experts of Mixtral-like and Qwen2-MoE-like models as stacked 3-D parameters
(`experts.gate_up_proj` (E, 2*I, H), `experts.down_proj` (E, H, I)) instead of one `nn.Linear` per projection
and expert, and turned the router `gate` into a module holding a bare `weight`. A v4 adapter targeted those
linears by name, so (as HF PEFT does) it is moved to LoRA on parameters (`target_parameters`, see params.py):

* config, at injection: v4 names in `target_modules` become `target_parameters` entries (`w1`/`w3` or
  `gate_proj`/`up_proj` -> `gate_up_proj`, `w2`/`down_proj` -> `down_proj`, `gate` -> `gate.weight`). Two
  projections fused into one parameter get one LoRA of rank 2r (alpha doubled, so alpha / r is kept) whose
  factors are block-diagonal in the two original ones: [B1 0; 0 B3] @ [A1; A3] = [B1 A1; B3 A3].
* weights, on load: per-expert factors are stacked in the layout of params.py (A rows expert-major, B columns
  rank-major) and the v4 module path is renamed (`block_sparse_moe` -> `mlp`). Saving keeps the v5 layout.

Which model types convert follows transformers' own checkpoint conversion tables (`conversion_mapping`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ....core import targeting
from ..params import ParamLora


@dataclass(frozen=True)
class MoeFamily:
    """How one family of v4 MoE models maps onto v5: `targets` (v4 name, v5 parameter) in matching order."""

    targets: tuple[tuple[str, str], ...]
    renames: tuple[tuple[str, str], ...] = ()  # (v4, v5) substrings of LoRA weight keys

    def match(self, target: str) -> tuple[str, str] | None:
        """(v4 name, v5 parameter) of a `target_modules` entry (a name or dotted suffix) naming a v4 MoE
        linear."""
        return next(((old, new) for old, new in self.targets if target == old or target.endswith("." + old)),
                    None)

    def sources(self, new: str) -> list[str]:
        """v4 projections stacked into parameter `new`, in stacking order (e.g. gate before up)."""
        return [old for old, target in self.targets if target == new]

    def fused(self) -> dict[str, list[str]]:
        return {new: self.sources(new) for _, new in self.targets if len(self.sources(new)) > 1}


FAMILIES = {
    "mixtral": MoeFamily(
        targets=(("gate", "gate.weight"), ("w1", "gate_up_proj"), ("w3", "gate_up_proj"),
                 ("w2", "down_proj")),
        renames=((".block_sparse_moe.", ".mlp."),),
    ),
    "qwen2_moe": MoeFamily(
        targets=(("gate", "gate.weight"), ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
                 ("down_proj", "down_proj")),
    ),
}
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------- which models
def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _transformers_tables(model_type: str) -> tuple[bool, dict[str, str]]:
    """(does transformers convert checkpoints of `model_type`, its model type -> shared conversion table
    aliases)."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # transformers < 5: the v4 layout is still the model's own
        return False, {}
    has_mapping = conversion_mapping.get_checkpoint_conversion_mapping(model_type) is not None
    return has_mapping, dict(getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}))


def config_family(model: nn.Module) -> MoeFamily | None:
    """Family whose v4 target names are rewritten at injection. As in HF PEFT, found through transformers'
    alias table (where Mixtral is added to itself); a model type that is itself a table name (qwen2_moe) is
    not in it."""
    model_type = _model_type(model)
    if model_type is None:
        return None
    has_mapping, aliases = _transformers_tables(model_type)
    aliases["mixtral"] = "mixtral"
    return FAMILIES.get(aliases.get(model_type)) if has_mapping else None


def weights_family(model: nn.Module) -> MoeFamily | None:
    """Family whose v4 weight keys are converted on load: the model type's own table, or the one it
    aliases."""
    model_type = _model_type(model)
    if model_type is None:
        return None
    has_mapping, aliases = _transformers_tables(model_type)
    if not has_mapping:
        return None
    return FAMILIES.get(model_type) or FAMILIES.get(aliases.get(model_type))


# ---------------------------------------------------------------------------------------------- config
def _resolve_string_targets(config, model: nn.Module, family: MoeFamily, all_linear) -> set[str]:
    """Leaf names a str `target_modules` ("all-linear" or a regex) selects, counting the v4 experts it would
    match."""
    old_names = {old for old, _ in family.targets}
    if config.target_modules.lower() == targeting.ALL_LINEAR:
        # the v4 experts and router were nn.Linear too; on v5 they are not, so add their v4 names
        return {name.rsplit(".", 1)[-1] for name in all_linear(model)} | old_names
    module_keys = [name for name, _ in model.named_modules()]
    param_keys = [name for name, _ in model.named_parameters()]
    leaves = {key.rsplit(".", 1)[-1] for key in module_keys + param_keys if targeting.is_target(config, key)}
    owners: dict[str, set[str]] = defaultdict(set)  # v5 parameter leaf -> modules holding it
    for key in param_keys:
        owner, _, leaf = key.rpartition(".")
        owners[leaf].add(owner)
    for old, new in family.targets:
        # a v4 expert projection matched `<experts module>.<old>`; that key no longer exists, so probe it
        if old not in leaves and any(targeting.is_target(config, f"{owner}.{old}")
                                     for owner in owners.get(new, ())):
            leaves.add(old)
    return leaves


def _check_fused(family: MoeFamily, present: dict[str, set[str]]) -> None:
    for new, sources in family.fused().items():
        found = present.get(new, set())
        if 0 < len(found) < len(sources):
            missing = sorted(set(sources) - found)
            raise ValueError(
                f"This LoRA config targets {sorted(found)} but not {missing}; on transformers v5 these "
                f"projections are fused into the single parameter '{new}', which can only be adapted as a "
                f"whole. Add {missing} to target_modules (or target '{new}' through target_parameters)."
            )


def convert_config(config, model: nn.Module, all_linear) -> None:
    """Rewrite a LoRA config written for a v4 MoE model for the v5 model `model`, in place (HF PEFT's rules).

    `all_linear(model)` -> full names of the linear layers "all-linear" selects. Note that on such models
    target_modules=None becomes an empty set, so no default targets get filled in afterwards (as in HF PEFT).
    """
    family = config_family(model)
    if family is None or getattr(config, "peft_type", None) != "LORA":
        return
    if config.target_modules is None and not config.target_parameters:
        raise ValueError(
            f"LoraConfig has neither target_modules nor target_parameters. For {_model_type(model)!r} "
            "models, whose layout changed in transformers v5, no default targets are filled in (as in HF "
            "PEFT): set target_modules (e.g. ['q_proj', 'v_proj']) and/or target_parameters (e.g. "
            "['experts.gate_up_proj', 'experts.down_proj'])."
        )
    if isinstance(config.target_modules, str):
        resolved = _resolve_string_targets(config, model, family, all_linear)
        if not resolved:
            return  # matched nothing: the usual "no target found" error follows
        config.target_modules = resolved
    config.rank_pattern = config.rank_pattern or {}
    config.alpha_pattern = config.alpha_pattern or {}
    parameters = set(config.target_parameters or ())
    modules: set[str] = set()
    present: dict[str, set[str]] = defaultdict(set)
    for target in set(config.target_modules or ()):
        matched = family.match(target)
        if matched is None:
            modules.add(target)
            continue
        parameters.add(matched[1])
        present[matched[1]].add(matched[0])
    _check_fused(family, present)
    for new, sources in family.fused().items():
        if len(present.get(new, ())) == len(sources):
            config.rank_pattern[rf".*\.{re.escape(new)}"] = config.r * len(sources)
            config.alpha_pattern[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(sources)
    config.target_parameters = parameters
    config.target_modules = modules


# ---------------------------------------------------------------------------------------------- weights
def _expert_key_pattern(family: MoeFamily) -> re.Pattern:
    projections = "|".join(re.escape(old) for old, new in family.targets if new in EXPERT_PARAMS)
    return re.compile(
        rf"^(?P<owner>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>{projections})\.(?P<lora>lora_[AB])\.weight$")


def _stacked(per_expert: dict[int, torch.Tensor], where: str) -> torch.Tensor:
    indices = sorted(per_expert)
    if indices != list(range(len(indices))):
        raise ValueError(f"The v4 adapter has LoRA weights for experts {indices} of '{where}' only; "
                         "converting it to the fused v5 expert parameters needs every expert 0..E-1.")
    return torch.stack([per_expert[i] for i in indices])  # (E, ., .)


def _fuse(lora: str, stacks: list[torch.Tensor]) -> torch.Tensor:
    """Per-projection (E, r, in) A / (E, out, r) B stacks -> params.py's 2-D A (E*n*r, in) / B (n*out,
    n*r*E)."""
    if lora == "lora_A":
        return torch.cat(stacks, dim=1).flatten(0, 1)  # row e*n*r + j: expert e, fused rank j
    blocks = torch.stack([torch.block_diag(*[s[e] for s in stacks]) for e in range(stacks[0].shape[0])])
    return blocks.permute(2, 0, 1).flatten(0, 1).T  # column j*E + e: fused rank j, expert e


def _wrapper_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """(owner module name without '.base_layer', wrapped parameter) -> name of the ParamLora doing it."""
    return {(re.sub(r"(\.base_layer)+$", "", name), module.parameter_name): name
            for name, module in model.named_modules() if isinstance(module, ParamLora)}


def _target_key(wrappers: dict, owner: str, new: str, lora: str) -> str:
    name = wrappers.get((owner, new))
    if name is None:  # not adapted in this model: HF PEFT's names (gate_up_proj inner, down_proj outer)
        name = f"{owner}.base_layer" if new == "gate_up_proj" else owner
    return f"{name}.{lora}.weight"


def _renamed(key: str, family: MoeFamily) -> str:
    for old, new in family.renames:
        key = key.replace(old, new)
    return key


def convert_state(model: nn.Module, base_model: nn.Module,
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v4 LoRA weight keys of an MoE adapter file -> the v5 keys and layout of `model` (whose keys the file
    uses).

    Only `lora_*` keys change; others (modules_to_save copies, ...) pass through. Nothing changes for other
    models.
    """
    family = weights_family(base_model)
    if family is None or not any(".lora_" in key for key in tensors):
        return tensors
    pattern, by_param = _expert_key_pattern(family), {old: new for old, new in family.targets}
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str, str], dict[str, dict[int, torch.Tensor]]] = defaultdict(
        lambda: defaultdict(dict))
    for key, value in tensors.items():
        if ".lora_" not in key:
            out[key] = value
            continue
        key = _renamed(key, family)
        match = pattern.match(key)
        if match is None:
            out[key] = value
            continue
        new = by_param[match["proj"]]
        groups[(match["owner"], new, match["lora"])][match["proj"]][int(match["expert"])] = value
    wrappers = _wrapper_names(model)
    for (owner, new, lora), per_proj in groups.items():
        missing = [p for p in family.sources(new) if p not in per_proj]
        if missing:
            raise ValueError(
                f"The v4 adapter has no {lora} weights for {missing} under '{owner}', which are fused "
                f"with {sorted(per_proj)} into '{new}' on transformers v5; the file is incomplete.")
        stacks = [_stacked(per_proj[p], f"{owner}.*.{p}") for p in family.sources(new)]
        out[_target_key(wrappers, owner, new, lora)] = _fuse(lora, stacks)
    return out
