"""Every fine-tuning method is described in one place: its module in trainers/methods/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainers import methods
from trainers.methods import METHODS
from trainers.methods._lora import LoraFamilyConfig
from trainers.methods._traits import Traits

ROOT = Path(__file__).resolve().parents[2]


def packages() -> list[str]:
    """rayft's top-level packages, as pyproject.toml lists them for setuptools (`cluster*`, `trainers*`, ...)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*") for pattern in include})
_NAME = "|".join(re.escape(n) for n in METHODS)
_LIT = rf"""["']({_NAME})["']"""
#: A comparison with a method-name literal: `x == "lora"`, `"full" != x`, `x in ("lora", ...)`, `x not in {...}`.
COMPARISON = re.compile(
    rf"""(?:==|!=)\s*[(\[{{]?\s*{_LIT}|{_LIT}\s*(?:==|!=)|\bin\s*[(\[{{][^)\]}}]*{_LIT}"""
)


def method_name_comparisons() -> list[str]:
    found = []
    for package in [*packages(), "bench"]:  # the benchmarks drive rayft like any caller does
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "trainers" / "methods"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if COMPARISON.search(line.split("#", 1)[0]):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_no_method_name_comparison_outside_methods():
    """Code outside trainers/methods/ asks a method's traits and hooks; it never compares the method's name."""
    assert {"cluster", "trainers", "serve", "storage"} <= set(packages())
    assert (ROOT / "bench").is_dir()
    assert method_name_comparisons() == []


@pytest.mark.parametrize("line", [
    'is_adapter = spec.method.name != "full"',
    'if "qlora" == name:',
    "if method in ('lora', 'rslora'):",
    'if m not in {"adalora", "ia3"}:',
    'elif families == {"ia3"}:',
])
def test_the_grep_catches_comparisons(line):
    assert COMPARISON.search(line)


@pytest.mark.parametrize("line", [
    'methods += [_method_config("lora", "instruction")]',
    'if tm in ("default", "all-linear"):',
    'if options.full:',
])
def test_the_grep_leaves_other_lines(line):
    assert not COMPARISON.search(line)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_module_has_the_same_shape(name):
    module = METHODS[name]
    assert isinstance(module.TRAITS, Traits)
    for hook in ("Config", "problems", "quantization_config", "peft_config", "after_optimizer_step"):
        assert callable(getattr(module, hook)), f"{name} lacks {hook}"
    assert module.Config().name == name
    assert module.problems({"method": {"name": name}}) == []
    if module.TRAITS.tunable:  # tune searches the LoRA-family fields
        assert issubclass(module.Config, LoraFamilyConfig)
    if module.TRAITS.rank_field is not None:
        assert module.TRAITS.rank_field in module.Config.model_fields


def test_traits_derive_the_method_sets():
    assert methods.ZERO3_METHODS == ("full", "lora", "rslora")
    assert methods.TUNABLE_METHODS == ("lora", "qlora", "dora", "rslora")
    assert methods.ADAPTER_METHODS == set(METHODS) - {"full"}
    assert methods.known_traits("no-such-method") is None and methods.known_traits(None) is None


def test_lora_family_shares_one_config_base_with_its_own_defaults():
    assert [n for n, m in METHODS.items() if issubclass(m.Config, LoraFamilyConfig)] == ["lora", "qlora", "dora", "rslora"]
    assert (METHODS["rslora"].Config().r, METHODS["qlora"].Config().r, METHODS["lora"].Config().r) == (64, 16, 8)
    assert list(METHODS["qlora"].Config().model_dump())[:2] == ["name", "r"]  # the discriminator dumps first, as before


def test_method_rules_come_from_the_method():
    raw = {"method": {"name": "ia3"}, "resources": {"strategy": "deepspeed_zero3"}}
    assert methods.method_problems(raw) == [
        "resources.strategy: got 'deepspeed_zero3', which rayft runs for methods full, lora, rslora, not ia3; "
        "use one of those methods, or strategy ddp for ia3"
    ]
    qlora = methods.method_problems({"method": {"name": "qlora"}, "resources": {"strategy": "deepspeed_zero3"}})
    assert len(qlora) == 1 and "4-bit (qlora) base cannot be sharded" in qlora[0]  # its own rule, not the generic one
    assert methods.method_problems({"method": {"name": "adalora", "init_r": 4, "target_r": 8}}) == [
        "method.adalora.target_r: got 8, must be <= init_r (4)"
    ]
