"""The method registry against what the project claims: the README's method table and the test matrices.

Every method the README lists is registered under HF PEFT's `peft_type`, importable from `fastpeft` under HF
PEFT's config name, and every registered method has rows in a contract matrix (tests/cases.py for layer
methods, tests/prompt_helpers.py for soft prompts) or a named dedicated suite.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import fastpeft
from fastpeft import registry
from fastpeft.types import PeftType

from cases import METHOD_CASES
from prompt_helpers import METHODS as PROMPT_METHODS

TESTS = Path(__file__).resolve().parents[1]
README = TESTS.parent / "README.md"

# prompt methods whose forward needs method-specific inputs: their contract lives in their own test file
DEDICATED_SUITES = {
    "MULTITASK_PROMPT_TUNING": "methods/test_multitask_prompt_tuning.py",  # task_ids in every call
    "CPT": "methods/test_cpt.py",  # causal LM only, token-type masks of its own
    "SHADOW": "methods/test_shadow.py",  # not mergeable, no mixed batches; causal LM / SEQ_CLS only
    "XLORA": "methods/test_xlora.py",  # needs LoRA expert folders and use_cache=False; not mergeable
}


def claimed_methods() -> dict[str, str]:
    """{peft_type: config class name} from the README's method table (rows
    `| name | `PEFT_TYPE` | Config | ...`)."""
    rows = re.findall(r"^\|[^|]+\|\s*`([A-Z_0-9]+)`\s*\|\s*`(\w+)`\s*\|", README.read_text(), flags=re.M)
    assert rows, "README.md has no method table"
    return dict(rows)


def test_readme_table_is_registered_and_exported():
    registered = registry.registered()
    for peft_type, config_name in claimed_methods().items():
        spec = registered.get(PeftType(peft_type))
        assert spec is not None, f"README claims {peft_type} but it is not registered"
        assert spec.config_cls.__name__ == config_name
        assert getattr(fastpeft, config_name) is spec.config_cls, f"fastpeft.{config_name} is not exported"


def test_every_registered_method_is_in_the_readme_table():
    claimed = set(claimed_methods())
    missing = sorted(p.value for p in registry.registered() if p.value not in claimed)
    assert not missing, f"registered but not listed in README.md's method table: {missing}"


@pytest.mark.parametrize("peft_type", sorted(p.value for p in registry.registered()))
def test_every_registered_method_has_matrix_rows(peft_type):
    spec = registry.get_spec(peft_type)
    name = spec.config_cls.__name__
    if spec.prompt_cls is not None and peft_type not in DEDICATED_SUITES:
        assert any(cls == name for cls, _ in PROMPT_METHODS.values()), (
            f"{name}: no row in prompt_helpers.METHODS")
    elif peft_type in DEDICATED_SUITES:
        assert (TESTS / DEDICATED_SUITES[peft_type]).is_file()
    else:
        assert any(c.method == name for c in METHOD_CASES), f"{name}: no row in tests/cases.py"


def test_unknown_type_error_lists_the_known_ones():
    with pytest.raises(ValueError, match="'NOT_A_PEFT_TYPE' is not a method type fastpeft knows.*LORA"):
        registry.get_spec("NOT_A_PEFT_TYPE")


def test_unregistered_type_error_lists_the_supported_ones(monkeypatch):
    monkeypatch.delitem(registry._REGISTRY, PeftType.XLORA)
    with pytest.raises(ValueError, match="'XLORA' is not supported by fastpeft yet.*LORA"):
        registry.get_spec("XLORA")


def test_a_second_spec_for_a_registered_type_is_refused():
    spec = registry.get_spec("LORA")
    assert registry.register(spec) is spec  # the same spec again (a module imported twice) is fine
    other = dataclasses.replace(spec, prefix="other_")
    with pytest.raises(ValueError, match="LORA is registered twice"):
        registry.register(other)
    assert registry.get_spec("LORA") is spec


# what a config of each method needs beyond its defaults to be valid
REQUIRED_ARGS = {"ADALORA": {"total_step": 10}, "CPT": {"task_type": "CAUSAL_LM"}}


@pytest.mark.parametrize("peft_type", sorted(p.value for p in registry.registered()))
def test_spec_is_where_type_and_prefix_are_declared(peft_type):
    """Configs (built or read from a file) and tuners take their peft_type and prefix from the MethodSpec."""
    spec = registry.get_spec(peft_type)
    args = REQUIRED_ARGS.get(peft_type, {})
    built = spec.config_cls(**args)
    read = fastpeft.PeftConfig.from_peft_type(**{**built.to_json_dict(), "peft_type": peft_type})
    for config in (built, read):
        assert type(config) is spec.config_cls
        assert config.peft_type is spec.peft_type  # a PeftType member, as transformers reads `.value`
    if spec.tuner_cls is not None:
        assert spec.tuner_cls.prefix == spec.prefix


def test_a_tuner_stating_another_prefix_is_refused(monkeypatch):
    unused = next((p for p in PeftType if p not in registry.registered()), None)
    if unused is None:  # every type is registered: free one for this test (monkeypatch puts it back)
        unused = PeftType.XLORA
        monkeypatch.delitem(registry._REGISTRY, unused)

    class OtherTuner(registry.get_spec("IA3").tuner_cls):
        prefix = "other_"

    spec = registry.MethodSpec(peft_type=unused, config_cls=type("C", (fastpeft.PeftConfig,), {}),
                               prefix="own_", tuner_cls=OtherTuner)
    with pytest.raises(ValueError, match="OtherTuner.prefix is 'other_'"):
        registry.register(spec)
    assert unused not in registry.registered() and spec.config_cls.PEFT_TYPE is None


def test_a_regex_entry_of_a_default_target_table_stays_a_regex():
    from types import SimpleNamespace

    from fastpeft.integrations.transformers_defaults import default_targets

    model = SimpleNamespace(config=SimpleNamespace(model_type="toy"))
    assert default_targets({"toy": r".*\.(q|v)_proj"}, model, "X") == r".*\.(q|v)_proj"
    assert default_targets({"toy": ["q", "v"]}, model, "X") == {"q", "v"}
    # what every method's prepare_config calls (WaveFT's table has such a row, from HF PEFT's)
    from fastpeft.methods._shared.common import fill_targets

    config = SimpleNamespace(target_modules=None)
    assert fill_targets(config, model, {"toy": r".*\.(q|v)_proj"}, "X").target_modules == r".*\.(q|v)_proj"


# fastpeft's own methods: PeftType members HF PEFT 0.21.2 lacks (HF PEFT cannot read their folders)
FASTPEFT_OWN = {"BOTTLENECK"}


def test_peft_type_is_hf_peft_members_plus_fastpeft_own():
    import peft

    hf = {p.value for p in peft.PeftType}
    assert {p.value for p in PeftType} == hf | FASTPEFT_OWN
    assert not hf & FASTPEFT_OWN, "HF PEFT now has a type listed as fastpeft's own: do the formats agree?"
    assert list(PeftType)[-len(FASTPEFT_OWN):] == [PeftType(v) for v in sorted(FASTPEFT_OWN)]  # listed last
    readme = README.read_text()
    for value in FASTPEFT_OWN:  # the README says HF PEFT has no such type
        assert re.search(rf"^\|[^|]*fastpeft only[^|]*\|\s*`{value}`", readme, flags=re.M), value


def test_every_peft_type_is_registered():
    """HF PEFT 0.21.2's 45 types and fastpeft's own: nothing is left unimplemented."""
    missing = sorted({p.value for p in PeftType} - {p.value for p in registry.registered()})
    assert not missing, f"PeftType members with no registered method: {missing}"
    assert set(PeftType) == set(registry.registered())


def test_case_names_are_unique():
    names = [case.id for case in METHOD_CASES]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


TUNER_TYPES = sorted(p.value for p, s in registry.registered().items() if s.tuner_cls)


@pytest.mark.parametrize("peft_type", TUNER_TYPES)
def test_every_tuner_class_says_whether_it_can_be_injected(peft_type):
    """api.inject_adapter_in_model reads `injectable` from any tuner class, Tuner subclass or not (X-LoRA)."""
    assert isinstance(registry.get_spec(peft_type).tuner_cls.injectable, bool)
