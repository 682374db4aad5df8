"""`IA3Config`: HF PEFT 0.21's fields and defaults for (IA)^3 (Liu et al., 2022,
https://arxiv.org/abs/2205.05638)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: a learned vector per target layer rescales its output, or its input for
    `feedforward_modules`."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Names (exact or dotted suffixes), a full-match regex, or 'all-linear'; default: the model "
                "type's table (methods/ia3/defaults.py)."})
    exclude_modules: list[str] | str | None = field(default=None,
                                                    metadata={"help": "Names or regex to skip."})
    feedforward_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Targets whose INPUT is rescaled (the paper's feed-forward vectors); others rescale their "
                "output. A list (matched as name endings, a subset of target_modules) or a full-match regex; "
                "default: the model type's table."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "Base weight stored as (in, out), e.g. GPT-2's Conv1D (set automatically per layer type)."})
    modules_to_save: list[str] | None = field(default=None,
                                              metadata={"help": "Modules trained and saved whole."})
    init_ia3_weights: bool = field(default=True, metadata={
        "help": "True: vectors start at ones (the adapter is a no-op); False: random normal (for tests)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(
                f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}.")
        ff, targets = self.feedforward_modules, self.target_modules
        if not (isinstance(ff, set) and isinstance(targets, set)):
            return
        # an entry may also be the ending of a full target name ('all-linear' saves full names; HF PEFT then
        # refuses to reload its own file, fastpeft accepts it)
        stray = sorted(f for f in ff if not any(t == f or t.endswith(f) for t in targets))
        if stray:
            raise ValueError(
                f"IA3Config.feedforward_modules {stray} are not in target_modules {sorted(targets)}: every "
                "feed-forward module must also be a target; add them to target_modules or drop them from "
                "feedforward_modules."
            )
