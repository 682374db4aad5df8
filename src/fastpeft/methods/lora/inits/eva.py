"""EVA, Explained Variance Adaptation (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning
via Explained Variance Adaptation"): lora_A starts as the top right-singular vectors of each layer's inputs,
found by an incremental SVD over batches; ranks move between layers by explained variance within the budget
sum(r).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from copy import copy, deepcopy
from itertools import cycle

import torch
from torch import nn

from ....core import targeting
from ....core.tuner import set_submodule
from ..._shared.modules import is_linear
from ..layer import Conv, Embedding, LoraLayer, MultiheadAttention
from .eva_config import EvaConfig

logger = logging.getLogger(__name__)

SKIPPED_LAYERS = (Embedding, MultiheadAttention, Conv)  # EVA needs a 2-D input per token: linear layers only
RHO_LIMIT = 1000  # above this, rho is capped at (largest parameter dim) // r
PEFT_PREFIX = "base_model.model."
MIN_NAMES_TO_CONDENSE = 20  # from this many target names on, they are condensed to distinguishing suffixes


# -------------------------------------------------------------------------------------------- incremental SVD
class IncrementalSVD:
    """Incremental PCA over batches of rows (Ross et al. 2008, as in scikit-learn), each step a randomized SVD
    (torch.svd_lowrank, q = 2 * n_components, 4 iterations, seed 42) of the stacked previous components, the
    centred batch and a mean-shift row. Keeps `components_`, `singular_values_`, `explained_variance_ratio_`.
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.n_components, self.q, self.seed, self.niter = n_components, 2 * n_components, seed, niter
        self.mean = self.var = None
        self.count = torch.tensor([0])
        self.components_ = self.singular_values_ = self.explained_variance_ratio_ = None

    @property
    def fitted(self) -> bool:
        return self.components_ is not None

    def _moments(self, x: torch.Tensor):
        """Running mean and (biased) variance in float64 after adding the rows of `x` (Chan et al. update)."""
        n_new = torch.tensor([x.shape[0]], device=x.device)
        total = self.count.to(x.device) + n_new
        old_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if self.mean is None \
            else self.mean * self.count
        new_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - new_sum / n_new
        new_ss = centred.square().sum(dim=0, dtype=torch.float64)
        new_ss -= centred.sum(dim=0, dtype=torch.float64).square() / n_new
        if self.var is None:
            return (old_sum + new_sum) / total, new_ss / total, total
        ratio = self.count.double() / n_new
        ss = self.var * self.count + new_ss + ratio / total * (old_sum / ratio - new_sum).square()
        return (old_sum + new_sum) / total, ss / total, total

    def update(self, x: torch.Tensor) -> None:
        """Fold a (rows, features) batch into the decomposition."""
        x = x.to(torch.float32).clone()
        n_rows, n_features = x.shape
        if self.n_components > n_features:
            raise ValueError(f"EVA needs round(r * rho) = {self.n_components} <= in_features = {n_features}; "
                             "lower r or EvaConfig.rho for this layer.")
        mean, var, total = self._moments(x)
        if not self.fitted:
            x -= mean
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            shift = torch.sqrt(self.count.double() / total * n_rows) * (self.mean - batch_mean)
            x = torch.cat([self.singular_values_[:, None] * self.components_, x, shift[None]])
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        vh = v.mH
        pivot = vh.abs().argmax(dim=1)  # sign convention: each row's largest entry is positive
        vh = vh * torch.sign(vh[torch.arange(vh.shape[0]), pivot])[:, None]
        k = self.n_components
        self.components_, self.singular_values_ = vh[:k], s[:k]
        self.explained_variance_ratio_ = (s.square() / torch.sum(var * total))[:k]
        self.mean, self.var, self.count = mean, var, total


# ------------------------------------------------------------------------------------------ input preparation
def forward_fn_dict(model, inputs):
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config):
    """Indices (batch, position) of the tokens used: attention mask, minus label-masked tokens if
    configured."""
    if not isinstance(model_input, dict):
        raise TypeError(
            "prepare_model_inputs_fn_language_modeling needs dict batches (input_ids, attention_mask, ...);"
            " pass prepare_model_inputs_fn=None or your own function for other batches.")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva is not None and eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"EVA cannot read the input of layer '{layer_name}' ({type(layer_input).__name__}); "
                        "pass a prepare_layer_inputs_fn that returns a 2-D tensor.")
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The layer's input rows at the token indices from prepare_model_inputs_fn_language_modeling."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _flatten_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def _to_device(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


class _Recorder:
    """Forward hook: prepares a layer's input rows and passes them to `sink(name, rows)`."""

    def __init__(self, name: str, prepare: Callable, sink: Callable) -> None:
        self.name, self.prepare, self.sink, self.model_input = name, prepare, sink, None

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        self.sink(self.name, self.prepare(args, self.model_input, self.name))


# ---------------------------------------------------------------------------------------------- the SVD pass
class _EvaRun:
    """One EVA pass: hooks on the target layers, an SVD per distinct input, ranks redistributed every step."""

    def __init__(self, model, config, targets: list[str], forward_fn, prepare_model, prepare_layer) -> None:
        self.model, self.config, self.targets, self.forward_fn = model, config, targets, forward_fn
        self.prepare_model, self.eva = prepare_model, config.eva_config
        if isinstance(prepare_layer, Mapping):
            prepare_layer = dict(prepare_layer)
            self.prepare_layer = {n: prepare_layer.pop(n, None) or _flatten_inputs for n in targets}
            if prepare_layer:
                raise ValueError("prepare_layer_inputs_fn names modules that are not EVA targets: "
                                 f"{sorted(prepare_layer)}")
        else:
            self.prepare_layer = dict.fromkeys(targets, prepare_layer or _flatten_inputs)
        rho = self.eva.rho
        if rho > RHO_LIMIT:
            rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
        ranks = {n: targeting.pattern_value(config.rank_pattern, n, config.r) for n in targets}
        self.budget = sum(ranks.values())
        self.max_components = {n: round(r * rho) for n, r in ranks.items()}
        devices = {p.device for p in model.parameters() if p.device.type != "meta"}
        self.device = next(iter(devices)) if len(devices) == 1 else None
        self.svds, self.converged, self.recorders, self.handles = {}, {}, {}, {}

    def _model_input(self, batch):
        return self.prepare_model(batch, self.config) if self.prepare_model is not None else deepcopy(batch)

    def _hook(self, name: str, sink) -> None:
        recorder = self.recorders.setdefault(name, _Recorder(name, self.prepare_layer[name], sink))
        self.handles[name] = self.model.get_submodule(name).register_forward_hook(recorder)

    def _unhook(self, name: str) -> None:
        self.handles.pop(name).remove()

    def group_equal_inputs(self, batch) -> None:
        """Forward one batch; layers fed identical inputs (q/k/v, gate/up) share the SVD of the first of
        them."""
        seen: dict[str, bytes] = {}

        def fingerprint(name, rows):
            seen[name] = (tuple(rows.shape), rows.detach().float().cpu().numpy().tobytes())

        for name in self.targets:
            self._hook(name, fingerprint)
        model_input = self._model_input(batch)
        for recorder in self.recorders.values():
            recorder.model_input = model_input
        try:
            self.forward_fn(self.model, batch)
        finally:
            for name in self.targets:
                self._unhook(name)
        self.recorders.clear()
        groups: dict[bytes, list[str]] = {}
        for name in self.targets:
            if name not in seen:
                raise ValueError(f"EVA target layer '{name}' was not called in the forward pass.")
            groups.setdefault(seen[name], []).append(name)
        self.leader = {n: n for g in groups.values() for n in g[:1]}
        self.leader.update({n: g[0] for g in groups.values() for n in g[1:]})
        for group in groups.values():  # shared inputs: the largest max rank for all of them
            top = max(self.max_components[n] for n in group)
            self.max_components.update(dict.fromkeys(group, top))

    def _fit_rows(self, name: str, rows: torch.Tensor) -> None:
        svd = self.svds[name]
        if rows.shape[0] < svd.n_components:
            logger.info("EVA: skipping a step for '%s' (fewer than %d token rows).", name, svd.n_components)
            return
        previous = svd.components_
        svd.update(rows)
        if previous is not None:
            similarity = nn.functional.cosine_similarity(svd.components_, previous)
            self.converged[name] = similarity >= self.eva.tau

    def fit(self, dataloader) -> dict[str, int]:
        """Update the SVDs batch after batch (cycling the data) until every component in use has converged."""
        leaders = [n for n, lead in self.leader.items() if n == lead]
        for name in leaders:
            self.svds[name] = IncrementalSVD(self.max_components[name])
            self.converged[name] = torch.zeros(self.max_components[name], dtype=torch.bool)
            self._hook(name, self._fit_rows)
        done = dict.fromkeys(leaders, False)
        ranks = dict(self.max_components)
        try:
            for batch in cycle(dataloader):
                batch = _to_device(batch, self.device)
                model_input = self._model_input(batch)
                for name in leaders:
                    ok = bool(torch.all(self.converged[name][: ranks[name]]))
                    if ok and not done[name]:
                        self._unhook(name)
                        done[name] = True
                        continue
                    if done[name] and not ok:  # a grown rank needs components that have not settled yet
                        self._hook(name, self._fit_rows)
                        done[name] = False
                    self.recorders[name].model_input = model_input
                if all(done.values()):
                    return ranks
                self.forward_fn(self.model, batch)
                if all(self.svds[n].fitted for n in leaders):
                    ranks = self.rank_distribution()
        finally:
            for name in list(self.handles):
                self._unhook(name)
        raise ValueError("EVA: the dataloader yielded no batches.")

    def rank_distribution(self) -> dict[str, int]:
        """The `budget` largest explained-variance ratios over all layers; each layer gets as many ranks as it
        has among them (at most its max rank). Layers sharing an input: the SVD's owner takes the largest
        count."""
        names, ratios = [], []
        for name, lead in self.leader.items():
            part = self.svds[lead].explained_variance_ratio_[: self.max_components[name]]
            names += [name] * len(part)
            ratios += list(part)
        order = torch.stack(ratios).argsort(descending=True)[: self.budget]
        counts = dict.fromkeys(self.leader, 0)
        for i in order.tolist():
            counts[names[i]] += 1
        for name, lead in self.leader.items():
            if name != lead and counts[lead] < counts[name]:
                counts[lead], counts[name] = counts[name], counts[lead]
        return counts

    def components(self, ranks: dict[str, int]) -> dict[str, torch.Tensor]:
        """Each layer's top-`rank` components (rows of the new lora_A), whitened if configured."""
        result = {}
        for name, rank in ranks.items():
            lead = self.leader[name]
            if not bool(torch.all(self.converged[lead][:rank])):
                raise RuntimeError(f"EVA: layer '{name}' got rank {rank} before its components converged.")
            u = self.svds[lead].components_[:rank]
            if self.eva.whiten:
                u = u / self.svds[lead].singular_values_[:rank].sqrt()[:, None]
            result[name] = u if self.device is None else u.to(self.device)
        return result


# ---------------------------------------------------------------------------------------------- public API
def _tuner(model):
    """The LoRA tuner behind a PeftModel (or the tuner itself)."""
    return getattr(model, "tuner", model)


def _eva_targets(model, config, adapter_name: str, is_peft: bool) -> list[str]:
    if is_peft:
        return [n for n, m in model.named_modules()
                if isinstance(m, LoraLayer) and not isinstance(m, SKIPPED_LAYERS)
                and not getattr(m, "nested", False) and adapter_name in m.lora_A]
    return [n for n, m in model.named_modules() if is_linear(m)
            and (config.target_modules is None or targeting.is_target(config, n))]


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config=None,
                       forward_fn: Callable | None = forward_fn_dict,
                       prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict[str, torch.Tensor]:
    """EVA's A matrices: {module name: (rank, in_features)} from the SVD of each target layer's inputs.

    `model` is a PeftModel (its LoRA layers are the targets; adapters off during the pass) or a plain model
    with `peft_config` (a LoraConfig whose target_modules pick nn.Linear / Conv1D layers).
    `forward_fn(model, batch)` runs a batch; `prepare_model_inputs_fn(batch, config)` and
    `prepare_layer_inputs_fn(layer_input, model_input, name)` (one function, or a dict per module name) choose
    the token rows used (default: attention and label masks). `gather_distributed_inputs` and
    `show_progress_bar` are accepted for HF PEFT compatibility.
    """
    if dataloader is None or len(dataloader) == 0:
        raise ValueError("EVA needs a non-empty dataloader (batches of model inputs) to compute the SVD.")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and gather_distributed_inputs:
        raise NotImplementedError("fastpeft's EVA does not gather inputs across ranks; pass "
                                  "gather_distributed_inputs=False (each rank then uses its own batches).")
    is_peft = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft:
            raise ValueError(
                "get_eva_state_dict needs peft_config (a LoraConfig) when model is not a PeftModel.")
        peft_config = model.peft_config[adapter_name]
    if peft_config.eva_config is None:
        peft_config = copy(peft_config)
        peft_config.eva_config = EvaConfig()
    targets = _eva_targets(model, peft_config, adapter_name, is_peft)
    if not targets:
        raise ValueError("EVA found no linear layers to initialise (check target_modules).")
    context = _tuner(model).adapters_disabled() if is_peft else nullcontext()
    training = model.training
    model.eval()
    try:
        with context:
            run = _EvaRun(model, peft_config, targets, forward_fn, prepare_model_inputs_fn,
                          prepare_layer_inputs_fn)
            run.group_equal_inputs(_to_device(next(iter(dataloader)), run.device))
            return run.components(run.fit(dataloader))
    finally:
        model.train(training)


def _condensed(targets: list[str], others: list[str]):
    """Many target names -> the few dotted suffixes that match them and no other module (shortest first)."""
    if len(targets) < MIN_NAMES_TO_CONDENSE:
        return targets

    def suffixes(name):
        parts = name.split(".")
        return [".".join(parts[i:]) for i in reversed(range(len(parts)))]

    taken = {s for name in others for s in suffixes(name)}
    chosen: set[str] = set()
    for name, options in sorted(((n, suffixes(n)) for n in set(targets)), key=lambda item: item[1]):
        if any(name == s or name.endswith("." + s) for s in chosen):
            continue
        chosen.add(next((s for s in options if s not in taken), name))
    return chosen or set(targets)


def _reset_layer(tuner, layer, adapter_name: str, config, r: int, alpha: float, init) -> None:
    """Rebuild adapter `adapter_name` of `layer` at rank r with the given init, on the base layer's device."""
    config = copy(config)
    config.init_lora_weights = init
    layer.update_layer(adapter_name, config, r=r, lora_alpha=alpha)
    tuner._place_adapter(layer, adapter_name, True)


def _load_eva_state_dict(model, eva_state_dict: dict, adapter_name: str) -> None:
    """Put EVA's components into lora_A (new ranks rebuild the layer; rank 0 removes it) and record the new
    target_modules / rank_pattern / alpha_pattern in the adapter's config (so saved files reload the same)."""
    tuner, config = _tuner(model), model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    state, kept, missing, others = dict(eva_state_dict), [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        short = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            others.append(short)
            continue
        r = targeting.pattern_value(config.rank_pattern, name, config.r)
        alpha = targeting.pattern_value(config.alpha_pattern, name, config.lora_alpha)
        w = state.pop(name) if name in state else state.pop(short, None)  # PeftModel or base-model names
        if w is None:
            _reset_layer(tuner, module, adapter_name, config, r, alpha, True)
            missing.append(short)
            new_rank = r
        elif w.shape[0] == 0:  # no variance share at all: the layer gets no adapter
            module.delete_adapter(adapter_name)
            if not module.adapter_names():
                set_submodule(model, name, module.unloaded(merge=False))
            continue
        else:
            new_rank = w.shape[0]
            if new_rank != r:
                alpha = alpha * new_rank / r if eva.adjust_scaling_factors else alpha
                _reset_layer(tuner, module, adapter_name, config, new_rank, alpha, "eva")
            module.lora_A[adapter_name].weight.copy_(w)
            kept.append(short)
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    config.target_modules = _condensed(kept + missing, others)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    tuner._apply_adapter_state()
    if missing:
        logger.warning("EVA: layers %s had no EVA components and got init_lora_weights=True (EVA skips %s).",
                       missing, [c.__name__ for c in SKIPPED_LAYERS])


@torch.no_grad()
def initialize_lora_eva_weights(
        model: nn.Module, dataloader: Iterable | None = None, eva_state_dict: dict | None = None,
        forward_fn: Callable | None = forward_fn_dict,
        prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
        prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling, adapter_name: str = "default",
        gather_distributed_inputs: bool = True, show_progress_bar: bool = True):
    """Initialise the LoRA adapter `adapter_name` of a PeftModel built with init_lora_weights='eva': compute
    EVA's components from `dataloader` (or take `eva_state_dict`), redistribute ranks and write lora_A in
    place. Other arguments as in `get_eva_state_dict`. Returns the model.
    """
    if not hasattr(model, "peft_config"):
        raise ValueError(
            "initialize_lora_eva_weights needs a PeftModel (get_peft_model(model, LoraConfig(...))).")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works with a single active adapter; "
                         f"active: {model.active_adapters}.")
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter '{adapter_name}' does not exist; loaded: {sorted(model.peft_config)}.")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("initialize_lora_eva_weights needs an adapter created with init_lora_weights='eva', "
                         f"got {model.peft_config[adapter_name].init_lora_weights!r}.")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError(
                "initialize_lora_eva_weights needs a dataloader (or a precomputed eva_state_dict).")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
