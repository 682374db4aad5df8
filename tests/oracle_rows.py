"""The contract-matrix rows HF PEFT checks (tests/cases.py rows with `hf_oracle`): each row's config in either
library, a model with the row's adapter trained away from its init, and its outputs. Used by the oracle matrix
(tests/core/test_oracle_matrix.py) and the load options (tests/checkpoint/test_load_options.py)."""

from __future__ import annotations

import copy

import peft
import torch

from cases import METHOD_CASES, config_class
from models import MODELS, forward, perturb

ORACLE_ROWS = [c for c in METHOD_CASES if c.hf_oracle]


def row_config(lib, case):
    """The row's config in `lib` (fastpeft or HF PEFT), its task_type as `lib`'s TaskType."""
    kwargs = copy.deepcopy(case.kwargs)
    if "task_type" in kwargs:
        kwargs["task_type"] = getattr(lib.TaskType, kwargs["task_type"])
    if lib is peft:
        return getattr(peft, case.method)(**kwargs)
    return config_class(case.method)(**kwargs)


def trained_row(lib, case, seed: int = 0):
    """A model of `lib` with the row's adapter moved off its init by seeded noise, in eval mode."""
    torch.manual_seed(seed)
    model = lib.get_peft_model(MODELS[case.model][0](), row_config(lib, case))
    return perturb(model, seed, 0.1).eval()


def row_outputs(model, case):
    return forward(model, MODELS[case.model][1]())
