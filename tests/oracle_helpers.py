"""Oracle checks shared by the method test files: the same adapter in fastpeft and HF PEFT must give the same
files, outputs, gradients and merged weights. `close(actual, expected, what)` is each file's comparison."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft

import models


def unordered(value):
    """Config values compared without order (HF PEFT writes sets in hash order)."""
    return sorted(value, key=str) if isinstance(value, list) else value


def assert_same_files(ours: Path, theirs: Path, fields=None, exact: bool = True) -> None:
    """Same safetensors keys, dtypes and values (bitwise unless `exact=False`) and the same config `fields`
    (all fields but peft_version when None)."""
    a = load_file(str(Path(ours) / "adapter_model.safetensors"))
    b = load_file(str(Path(theirs) / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    ca, cb = (json.loads((Path(p) / "adapter_config.json").read_text()) for p in (ours, theirs))
    keys = (set(ca) | set(cb)) - {"peft_version"} if fields is None else fields
    assert {k: unordered(ca.get(k)) for k in keys} == {k: unordered(cb.get(k)) for k in keys}


def assert_files_both_ways(theirs, base, inputs, tmp_path: Path, close, exact: bool = True) -> None:
    """HF PEFT model `theirs` saved -> loaded by fastpeft (same outputs) -> saved by fastpeft (same files) ->
    loaded by HF PEFT (same outputs). `base()` builds a fresh base model, `inputs` feeds `models.forward`."""
    expected = models.forward(theirs, inputs)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = fastpeft.PeftModel.from_pretrained(base(), str(tmp_path / "hf")).eval()
    close(models.forward(ours, inputs), expected, "HF file -> fastpeft")
    ours.save_pretrained(str(tmp_path / "ours"))
    assert_same_files(tmp_path / "ours", tmp_path / "hf", exact=exact)
    back = peft.PeftModel.from_pretrained(base(), str(tmp_path / "ours")).eval()
    close(models.forward(back, inputs), expected, "fastpeft file -> HF")


def gradients(model, inputs) -> dict[str, torch.Tensor]:
    """Gradients of mean(output^2) w.r.t. every trainable parameter, by name (training mode)."""
    model.train()
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    (out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(ours, theirs, inputs, close) -> None:
    a, b = gradients(ours, inputs), gradients(theirs, inputs)
    assert sorted(a) == sorted(b)
    for name in a:
        close(a[name], b[name], f"grad {name}")


def assert_merges_like_hf(ours, theirs, inputs, close, safe_merge: bool = False) -> None:
    """merge / unmerge keep the outputs and restore the base; merge_and_unload gives HF PEFT's weights."""
    expected = models.forward(theirs, inputs)
    models.assert_merge_roundtrip(ours, inputs, expected, close, safe_merge=safe_merge)
    merged_ours, merged_theirs = ours.merge_and_unload(safe_merge=safe_merge), theirs.merge_and_unload()
    close(models.forward(merged_ours, inputs), expected, "merge_and_unload")
    sd_a, sd_b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for key in sd_a:
        close(sd_a[key], sd_b[key], f"merged {key}")


class CaseTable:
    """A method test file's cases `{name: (tests/models.py MODELS key, config kwargs)}` and the builders its
    tests share: `config(lib, case, **extra)`, `base(case)` (a fresh base model), `inputs(case)`, and
    `build(lib, case)`, the adapted model with every trainable tensor moved off its init by `models.perturb`
    (seeded, by name), eval. `init_seed`, when set, seeds the global RNG right before `get_peft_model`
    (methods drawing their init from it)."""

    def __init__(self, cases: dict, ours_cls, theirs_cls, scale: float, init_seed: int | None = None):
        self.cases, self.classes = cases, {fastpeft: ours_cls, peft: theirs_cls}
        self.scale, self.init_seed = scale, init_seed

    def config(self, lib, case: str, **extra):
        return self.classes[lib](**{**copy.deepcopy(self.cases[case][1]), **extra})

    def base(self, case: str):
        return models.MODELS[self.cases[case][0]][0]()

    def inputs(self, case: str):
        return models.MODELS[self.cases[case][0]][1]()

    def fresh(self, lib, case: str, **extra):
        """The adapted model as `get_peft_model` leaves it (before any perturbation)."""
        model = self.base(case)
        if self.init_seed is not None:
            torch.manual_seed(self.init_seed)
        return lib.get_peft_model(model, self.config(lib, case, **extra))

    def build(self, lib, case: str, seed: int = 0, **extra):
        return models.perturb(self.fresh(lib, case, **extra), seed, self.scale).eval()


def assert_same_state_dict(a: dict, b: dict) -> None:
    """Two state dicts with the same keys and bit-identical tensors."""
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_differs(adapted, base) -> None:
    """The adapter visibly changes the outputs (so an equality check after it can fail)."""
    assert (adapted - base).abs().max().item() > 1e-3, "the adapter does not change the outputs"


def assert_gradients_like_hf(ours, theirs, inputs, close, marker: str) -> None:
    """`assert_same_gradients` with each forward drawn from the same RNG state (the same dropout masks), and a
    non-zero gradient on some parameter whose name holds `marker` (the adapter's own tensors)."""
    torch.manual_seed(0)
    a = gradients(ours, inputs)
    torch.manual_seed(0)
    b = gradients(theirs, inputs)
    assert sorted(a) == sorted(b)
    for name in a:
        close(a[name], b[name], f"grad {name}")
    assert any(marker in n and g.abs().max().item() > 1e-5 for n, g in a.items()), f"no gradient on {marker}"


def assert_shared_tensors_equal(ours, theirs, attrs, adapter: str = "default") -> None:
    """Tensors the tuner (`model.base_model`) holds once for all layers, e.g. VeRA's projections: the same
    shape, dtype and bits as HF PEFT's."""
    for attr in attrs:
        a, b = getattr(ours.base_model, attr)[adapter], getattr(theirs.base_model, attr)[adapter]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), attr
        assert torch.equal(a, b), attr


def assert_file_tensor_wins(theirs, attr: str, base, inputs, tmp_path: Path, close) -> None:
    """A shared tensor saved in HF PEFT's file is loaded, not drawn again from the config's seed: scaled in
    the HF model before saving, fastpeft gives the scaled model's outputs. `base()` builds a fresh base
    model."""
    with torch.no_grad():
        getattr(theirs.base_model, attr)["default"].mul_(1.5)
    expected = models.forward(theirs, inputs)
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    close(models.forward(ours, inputs), expected, f"{attr} from the file")


def assert_second_adapter_like_hf(with_other, base, inputs, tmp_path: Path, close) -> None:
    """`with_other(lib)`: a model of `lib` with a second, perturbed adapter 'other'. Active, 'other' gives HF
    PEFT's outputs; disabled, the base's; its saved folder equals HF PEFT's, whose folder loads in
    fastpeft."""
    results = {}
    for lib in (fastpeft, peft):
        model = with_other(lib)
        model.set_adapter("other")
        other = models.forward(model.eval(), inputs)
        with model.disable_adapter():
            disabled = models.forward(model, inputs)
        model.save_pretrained(str(tmp_path / lib.__name__))
        results[lib] = other, disabled
    close(results[fastpeft][0], results[peft][0], "second adapter")
    close(results[fastpeft][1], models.forward(base(), inputs), "disabled")
    assert_same_files(tmp_path / "fastpeft" / "other", tmp_path / "peft" / "other")
    loaded = fastpeft.PeftModel.from_pretrained(base(), str(tmp_path / "peft" / "other"),
                                                adapter_name="other")
    close(models.forward(loaded.eval(), inputs), results[peft][0], "HF 'other' file -> fastpeft")


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def assert_adapters_merge_like_hf(ours, theirs, inputs, close, exact_unmerge: bool = False) -> None:
    """All adapters of the two models active: merging keeps HF PEFT's outputs and gives its base weights,
    unmerging restores the base weights (bit-identical to HF PEFT's with `exact_unmerge`),
    merge_and_unload(safe_merge=True) gives HF PEFT's module types and outputs."""
    before = _base_weights(ours)
    for model in (ours, theirs):
        model.base_model.set_adapter(list(model.peft_config))
    expected = models.forward(theirs, inputs)
    close(models.forward(ours, inputs), expected, "all adapters active")
    for model in (ours, theirs):
        model.merge_adapter()
    close(models.forward(ours, inputs), expected, "merged")
    merged_theirs = _base_weights(theirs)
    for name, weight in _base_weights(ours).items():
        close(weight, merged_theirs[name], f"merged {name}")
    for model in (ours, theirs):
        model.unmerge_adapter()
    restored_theirs = _base_weights(theirs)
    for name, weight in _base_weights(ours).items():
        torch.testing.assert_close(weight, before[name], atol=1e-6, rtol=1e-5, msg=f"restored {name}")
        assert not exact_unmerge or torch.equal(weight, restored_theirs[name]), name
    unloaded, unloaded_theirs = (ours.merge_and_unload(safe_merge=True),
                                 theirs.merge_and_unload(safe_merge=True))
    assert {type(m) for m in unloaded.modules()} == {type(m) for m in unloaded_theirs.modules()}
    close(models.forward(unloaded, inputs), models.forward(unloaded_theirs, inputs), "merge_and_unload")


def assert_adapter_switching_like_hf(ours, theirs, inputs: dict, base_outputs, close) -> None:
    """Adapters 'default' and 'other' (token inputs, two rows): disabling gives the base outputs, set_adapter
    HF PEFT's, a mixed batch ('other', '__base__') each row's own, and after delete_adapter('other') HF
    PEFT's."""
    with ours.disable_adapter():
        close(models.forward(ours, inputs), base_outputs, "disabled")
    for name in ("other", "default"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        close(models.forward(ours, inputs), models.forward(theirs, inputs), f"adapter {name}")
    mixed = models.forward(ours, {**inputs, "adapter_names": ["other", "__base__"]})
    theirs.set_adapter("other")
    close(mixed[:1], models.forward(theirs, {k: v[:1] for k, v in inputs.items()}), "row 0 (other)")
    close(mixed[1:], base_outputs[1:], "row 1 (base)")
    theirs.delete_adapter("other")
    ours.delete_adapter("other")
    assert not any(".other" in k for k in ours.state_dict())
    close(models.forward(ours, inputs), models.forward(theirs, inputs), "after delete")


def rewrite_config(folder: Path, **changes) -> None:
    """Change fields of a saved adapter_config.json (to make an unusual or broken adapter folder)."""
    path = Path(folder) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def save_random_adapters(lib, make_model, make_config, folder, n: int, seed: int = 0) -> list[str]:
    """Save `n` adapters of `lib` (`make_config()` on a fresh `make_model()` each) whose lora_ weights are
    seeded random values (seed + i, scale 0.3) into folder/expert_<seed + i>; returns those folders (Arrow
    experts)."""
    paths = []
    for i in range(n):
        model = lib.get_peft_model(make_model(), make_config())
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        paths.append(str(Path(folder) / f"expert_{seed + i}"))
        model.save_pretrained(paths[-1])
    return paths


def assert_add_adapter_refused(model, name: str, config, match: str) -> None:
    """add_adapter(name, config) raises a ValueError matching `match` and leaves no trace of `name` behind."""
    with pytest.raises(ValueError, match=match):
        model.add_adapter(name, config)
    assert name not in model.peft_config
    assert not any(f".{name}" in k for k in model.state_dict()), f"{name} left tensors behind"


# ------------------------------------------------------------------ LyCORIS / OFT-style checks on a CaseTable
def assert_init_like_hf(table: CaseTable, case, tmp_path: Path, close, identity=True, fields=None,
                        hf_runs=True) -> None:
    """Made from the same seed, fresh adapters of both libraries give the same outputs (unless not `hf_runs`;
    the base model's when the init is the `identity`), the same file tensors and adapter_config.json `fields`
    (None: all)."""
    ours, theirs = (lib.get_peft_model(table.base(case), table.config(lib, case)).eval()
                    for lib in (fastpeft, peft))
    x = table.inputs(case)
    if hf_runs:
        close(models.forward(ours, x), models.forward(theirs, x), "at init")
    if identity:
        close(models.forward(ours, x), models.forward(table.base(case), x), "identity at init")
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "hf"))
    assert_same_files(tmp_path / "ours", tmp_path / "hf", fields=fields)


def assert_loads_both_ways(table: CaseTable, case, tmp_path: Path, close, exact: bool = True) -> None:
    """An adapter made by HF PEFT passes through fastpeft and back (`assert_files_both_ways`); one made by
    fastpeft loads in HF PEFT with the same outputs. Both adapters visibly change the outputs."""
    x = table.inputs(case)
    theirs = table.build(peft, case)
    assert_differs(models.forward(theirs, x), models.forward(table.base(case), x))
    assert_files_both_ways(theirs, functools.partial(table.base, case), x, tmp_path / "hf_made",
                           close, exact=exact)
    ours = table.build(fastpeft, case, seed=3)
    expected = models.forward(ours, x)
    assert_differs(expected, models.forward(table.base(case), x))
    ours.save_pretrained(str(tmp_path / "fastpeft_made"))
    back = peft.PeftModel.from_pretrained(table.base(case), str(tmp_path / "fastpeft_made")).eval()
    close(models.forward(back, x), expected, "fastpeft-made file -> HF")


def training_step(model, inputs, seed: int):
    """Training-mode output and gradients of mean(output^2) (by parameter name, zeros where none flowed),
    torch seeded to `seed` right before the forward so that dropout draws are reproducible."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = out if isinstance(out, torch.Tensor) else out.logits
    if out.requires_grad:  # False when module dropout skipped every adapter
        out.float().pow(2).mean().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_same_training_step(ours, theirs, inputs, close, seed: int = 0, skip: tuple = ()):
    """Same training output and gradients as HF PEFT under one seed (names holding a string of `skip` not
    compared); returns fastpeft's (output, gradients)."""
    (out, grads), (hf_out, hf_grads) = training_step(ours, inputs, seed), training_step(theirs, inputs, seed)
    close(out, hf_out, f"training output, seed {seed}")
    assert sorted(grads) == sorted(hf_grads)
    for name in grads:
        if not any(part in name for part in skip):
            close(grads[name], hf_grads[name], f"grad {name}, seed {seed}")
    return out, grads


def assert_dropout_draws_like_hf(ours, theirs, inputs, close, seeds) -> None:
    """Training-mode dropout draws what HF PEFT draws for each seed (same outputs and gradients), and the
    draws change the outputs from one seed to the next."""
    outs = [assert_same_training_step(ours, theirs, inputs, close, seed)[0] for seed in seeds]
    assert any((outs[0] - o).abs().max() > 1e-4 for o in outs[1:]), "dropout did not change anything"


def assert_dropout_never_merged(ours, theirs, inputs, close, targets) -> None:
    """Eval mode draws nothing; merge_adapter in training mode adds only the deterministic update (the merged
    eval outputs are the unmerged ones) and gives HF PEFT's base weights for the `targets` (module names)."""
    expected = models.forward(ours.eval(), inputs)
    close(models.forward(ours, inputs), expected, "eval mode draws nothing")
    for model in (ours, theirs):
        model.train()
        model.base_model.merge_adapter()
    close(models.forward(ours.eval(), inputs), expected, "merged in training mode")
    for name in targets:
        close(getattr(ours.base_model.model, name).base_layer.weight,
              getattr(theirs.base_model.model, name).base_layer.weight, f"merged {name} vs HF")


def assert_two_adapters_like_hf(table: CaseTable, case, other: dict, tmp_path: Path, close) -> None:
    """A second adapter 'other' (the case's config with `other` overrides) in both libraries: each active
    adapter gives HF PEFT's outputs, disabling gives the base, HF PEFT loads the saved 'other', deleting it
    leaves 'default'."""
    ours, theirs, x = table.build(fastpeft, case), table.build(peft, case), table.inputs(case)
    for lib, model in ((fastpeft, ours), (peft, theirs)):
        torch.manual_seed(7)  # same initial factors in both libraries
        model.add_adapter("other", table.config(lib, case, **other))
        models.perturb(model, 5, table.scale, wanted=lambda n: ".other" in n)
    for name in ("default", "other"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        close(models.forward(ours, x), models.forward(theirs, x), f"adapter {name}")
    with ours.disable_adapter():
        close(models.forward(ours, x), models.forward(table.base(case), x), "disabled")
    ours.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(table.base(case), str(tmp_path / "other"), adapter_name="other")
    close(models.forward(reloaded.eval(), x), models.forward(ours, x), "HF loads 'other'")
    ours.delete_adapter("other")
    assert all("other" not in n for n, _ in ours.named_parameters())
    ours.set_adapter("default")
    theirs.set_adapter("default")
    close(models.forward(ours, x), models.forward(theirs, x), "after delete")


def assert_merge_cycle_like_hf(ours, theirs, inputs, close, safe_merge=False, keeps_outputs=True) -> None:
    """merge_adapter moves the base weights (keeping the outputs when `keeps_outputs`), unmerge_adapter
    restores the weights and outputs, disabled models agree, merge_and_unload gives HF PEFT's weights."""
    expected = models.forward(ours, inputs)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.base_model.merge_adapter(safe_merge=safe_merge)
    if keeps_outputs:
        close(models.forward(ours, inputs), expected, "merged")
    assert any((weights[n] - p).abs().max() > 1e-4 for n, p in ours.named_parameters() if n in weights)
    ours.base_model.unmerge_adapter()
    close(models.forward(ours, inputs), expected, "unmerged")
    for n, p in ours.named_parameters():
        if n in weights:
            close(p, weights[n], f"restored {n}")
    with ours.disable_adapter(), theirs.disable_adapter():
        close(models.forward(ours, inputs), models.forward(theirs, inputs), "disabled")
    merged = ours.merge_and_unload(safe_merge=safe_merge)
    hf_weights = dict(theirs.merge_and_unload().named_parameters())
    for n, p in merged.named_parameters():
        close(p, hf_weights[n], f"merged weight {n}")
    if keeps_outputs:
        close(models.forward(merged, inputs), expected, "merge_and_unload")


def assert_adapter_sets_like_hf(ours, theirs, inputs, close, merged_keeps_outputs: bool) -> None:
    """Two adapters 'default' and 'other' (same tensors in both libraries): every active set gives HF PEFT's
    outputs, merging both gives HF PEFT's outputs (and the unmerged ones when `merged_keeps_outputs`),
    unmerging restores."""
    for active in (["default", "other"], "other", "default"):
        theirs.base_model.set_adapter(active)
        ours.base_model.set_adapter(active)
        close(models.forward(ours, inputs), models.forward(theirs, inputs), f"active={active}")
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    expected = models.forward(ours, inputs)
    for model in (theirs, ours):
        model.merge_adapter(["default", "other"])
    close(models.forward(ours, inputs), models.forward(theirs, inputs), "both merged vs HF")
    if merged_keeps_outputs:
        close(models.forward(ours, inputs), expected, "both merged")
    ours.unmerge_adapter()
    close(models.forward(ours, inputs), expected, "both unmerged")


def assert_mixed_batch_rows(model, inputs, names, close) -> None:
    """A batch with one adapter name per row ('__base__': none) gives each row what that adapter alone
    gives."""
    mixed = model(inputs, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = model(inputs[i:i + 1])
        else:
            model.base_model.set_adapter(name)
            want = model(inputs[i:i + 1])
        close(mixed[i:i + 1], want, f"row {i} ({name})")


def assert_same_config_json(ours, theirs, tmp_path: Path) -> None:
    """Configs `ours` (fastpeft) and `theirs` (HF PEFT) saved to tmp_path/"ours" and tmp_path/"hf" write the
    same adapter_config.json fields and values (but peft_version; lists without order)."""
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "hf"))
    a, b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "hf"))
    assert sorted(set(a) - {"peft_version"}) == sorted(set(b) - {"peft_version"})
    assert ({k: unordered(a[k]) for k in a if k != "peft_version"}
            == {k: unordered(b[k]) for k in b if k != "peft_version"})


# ------------------------------------------------------ HRA / MiSS / LN tuning: one adapter in both libraries
def same_adapter_pair(table: CaseTable, case, **extra):
    """(HF model, fastpeft model) holding the same adapter tensors: HF PEFT's perturbed adapter handed to a
    fresh fastpeft model through HF PEFT's state dict (every key used, none missing); both in eval mode."""
    theirs = table.build(peft, case, **extra)
    ours = table.fresh(fastpeft, case, **extra).eval()
    result = fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert not result.missing_keys and not result.unexpected_keys, result
    return theirs, ours


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def assert_saves_like_hf(table: CaseTable, case, tmp_path: Path, close) -> None:
    """HF PEFT's adapter (changing the outputs by more than 1e-4) passes through fastpeft and back
    (`assert_files_both_ways`); a fresh fastpeft model given its tensors trains the parameters HF PEFT trains
    and saves HF PEFT's file: the same keys and tensors, every config field alike."""
    theirs, x = table.build(peft, case), table.inputs(case)
    expected = models.forward(theirs, x)
    assert (expected - models.forward(table.base(case), x)).abs().max() > 1e-4, "the adapter changes nothing"
    assert_files_both_ways(theirs, functools.partial(table.base, case), x, tmp_path, close)
    theirs, ours = same_adapter_pair(table, case)
    assert _trainable(ours) == _trainable(theirs)
    ours.save_pretrained(str(tmp_path / "fresh"))
    assert_same_files(tmp_path / "fresh", tmp_path / "hf")


def build_with_other(table: CaseTable, lib, case, **other):
    """`table.build`'s model plus a second adapter 'other' (the case's config with the `other` overrides),
    moved off its init by seed 5; both adapters active."""
    model = table.build(lib, case)
    model.add_adapter("other", table.config(lib, case, **other))
    # ".other." inside ModuleDict names (lora_A.other.weight), a trailing ".other" for ParameterDicts
    models.perturb(model, 5, table.scale, wanted=lambda n: ".other." in n or n.endswith(".other")).eval()
    model.base_model.set_adapter(["default", "other"])
    return model


def assert_two_active_like_hf(table: CaseTable, case, close, **other) -> None:
    """Two active adapters (`build_with_other`): HF PEFT's outputs when disabled and for every active set,
    merged like HF PEFT (unmerging restores the base), merge_and_unload gives HF PEFT's weights."""
    theirs, ours = (build_with_other(table, lib, case, **other) for lib in (peft, fastpeft))
    x = table.inputs(case)
    with theirs.disable_adapter(), ours.disable_adapter():
        close(models.forward(ours, x), models.forward(theirs, x), "disabled")
    assert_adapter_sets_like_hf(ours, theirs, x, close, merged_keeps_outputs=True)
    assert_merges_like_hf(ours, theirs, x, close)


def assert_bf16_base_like_hf(table: CaseTable, case, **kwargs) -> None:
    """On a bfloat16 base (`kwargs` for get_peft_model, e.g. autocast_adapter_dtype): HF PEFT's parameter
    dtypes and bf16 outputs; after merge_adapter its base weights to within a bf16 ulp (fp32 products rounded
    to bf16)."""
    built = {lib: models.perturb(lib.get_peft_model(table.base(case).to(torch.bfloat16),
                                                    table.config(lib, case), **kwargs), 0, table.scale)
             for lib in (peft, fastpeft)}
    ours, theirs, x = built[fastpeft], built[peft], table.inputs(case).to(torch.bfloat16)
    assert ({n: p.dtype for n, p in ours.named_parameters()}
            == {n: p.dtype for n, p in theirs.named_parameters()})
    out, expected = models.forward(ours, x), models.forward(theirs, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    for model in (ours, theirs):
        model.merge_adapter()
    merged = _base_weights(theirs)
    for name, weight in _base_weights(ours).items():
        torch.testing.assert_close(weight, merged[name], atol=5e-4, rtol=1.6e-2, msg=name)


class ModelCaseTable(CaseTable):
    """A CaseTable whose model keys index `model_table` (tests/models.py's MODELS plus a test file's own
    models)."""

    def __init__(self, cases: dict, ours_cls, theirs_cls, scale: float, model_table: dict):
        super().__init__(cases, ours_cls, theirs_cls, scale)
        self.model_table = model_table

    def base(self, case: str):
        return self.model_table[self.cases[case][0]][0]()

    def inputs(self, case: str):
        return self.model_table[self.cases[case][0]][1]()


class SharedProjectionTests:
    """Tests for a method whose frozen random projections the tuner holds once for all layers and adapters
    (VeRA, RandLoRA). A test file subclasses it as `Test...` and sets: `table` (a CaseTable with "mlp" and
    "llama" cases, the "mlp" one adapting lin0 and head), `attr` (the first projection, e.g. "vera_A"),
    `other` (config changes of a second adapter), `larger_layer` (the refusal's message pattern) and
    `close`."""

    table: CaseTable
    attr: str
    other: dict
    larger_layer: str

    def close(self, actual, expected, what=""):
        raise NotImplementedError

    def _projections(self, model) -> list[str]:
        return list(getattr(model.base_model, self.attr).keys())

    def _with_other(self, case, lib):
        model = self.table.build(lib, case)
        model.add_adapter("other", self.table.config(lib, case, **self.other))
        models.perturb(model, 5, 0.1, wanted=lambda n: ".other" in n)
        shared = getattr(model.base_model, self.attr)
        assert shared["other"] is shared["default"]
        return model

    def test_saved_projections_are_loaded_not_redrawn(self, tmp_path):
        assert_file_tensor_wins(self.table.build(peft, "mlp"), self.attr, lambda: self.table.base("mlp"),
                                self.table.inputs("mlp"), tmp_path, self.close)

    @pytest.mark.parametrize("case", ["mlp", "llama"])
    def test_second_adapter_shares_projections_like_hf(self, case, tmp_path):
        assert_second_adapter_like_hf(lambda lib: self._with_other(case, lib), lambda: self.table.base(case),
                                      self.table.inputs(case), tmp_path, self.close)

    def test_delete_adapter_drops_its_projections(self):
        model = self.table.build(fastpeft, "mlp")
        model.add_adapter("other", self.table.config(fastpeft, "mlp"))
        model.delete_adapter("other")
        assert self._projections(model) == ["default"]
        assert not any(".other" in k for k in model.state_dict())

    @pytest.mark.parametrize("extra, match", [
        ({"projection_prng_key": 7}, "projection_prng_key must be the same"),
        ({"r": 8}, "same r"),
        ({"save_projection": False}, "save_projection"),
    ])
    def test_second_adapter_with_other_seed_r_or_save_projection_is_refused(self, extra, match):
        model = self.table.build(fastpeft, "mlp")
        assert_add_adapter_refused(model, "second", self.table.config(fastpeft, "mlp", **extra), match)
        assert self._projections(model) == ["default"]

    def test_second_adapter_on_a_larger_layer_is_refused(self):
        model = fastpeft.get_peft_model(self.table.base("mlp"),
                                        self.table.config(fastpeft, "mlp", target_modules=["head"]))
        assert_add_adapter_refused(model, "big", self.table.config(fastpeft, "mlp", target_modules=["lin0"]),
                                   self.larger_layer)

    def test_file_without_projections_but_save_projection_true_is_refused(self, tmp_path):
        self.table.build(peft, "mlp", save_projection=False).save_pretrained(str(tmp_path))
        rewrite_config(tmp_path, save_projection=True)
        with pytest.raises(ValueError, match="lacks.*save_projection"):
            fastpeft.PeftModel.from_pretrained(self.table.base("mlp"), str(tmp_path))
