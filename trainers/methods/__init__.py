"""Fine-tuning methods, registered by name. Everything rayft knows about a method is in its module.

Each method is one module of the same shape:
  - `Config`: its pydantic config (`name: Literal[...]` is the discriminator in the job spec); the LoRA family
    (lora, dora, rslora, qlora) shares `_lora.LoraFamilyConfig`;
  - `TRAITS`: what it is (`_traits.Traits`: adapter or model, ZeRO-3, tunable, how it serves, 4-bit base...);
  - `problems(raw)`: its cross-field rules on a raw job mapping, each a problem line;
  - `quantization_config(cfg, compute_dtype)`: a transformers quantization config for the base, or None;
  - `peft_config(cfg, total_steps)`: the peft config to wrap the base with, or None (full fine-tuning);
  - `after_optimizer_step(model, step)`: its per-step hook (AdaLoRA moves its rank budget), run by the worker loop.
Adding a method is adding one module and one line below. Code outside this package asks `traits(name)` and the
hooks; it never compares a method's name (tests/unit/test_methods.py keeps it so).
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

from storage.configs import raw_get
from trainers.methods import adalora, dora, full, ia3, lora, prefix_tuning, qlora, rslora
from trainers.methods._lora import LORA_FIELDS  # noqa: F401 - re-exported: the fields `rayft tune` searches
from trainers.methods._traits import Traits

METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "qlora": qlora,
    "dora": dora,
    "adalora": adalora,
    "ia3": ia3,
    "prefix_tuning": prefix_tuning,
    "rslora": rslora,
    "full": full,
}

#: The job spec's `method:` field: one of the method configs, chosen by `name`.
MethodConfig = Annotated[Union[tuple(m.Config for m in METHODS.values())], Field(discriminator="name")]

#: Methods whose result is an adapter (a peft directory), as opposed to a whole model.
ADAPTER_METHODS = frozenset(name for name, m in METHODS.items() if m.TRAITS.is_adapter)
#: Methods that run under strategy deepspeed_zero3 (sorted: they are listed in error messages).
ZERO3_METHODS = tuple(sorted(name for name, m in METHODS.items() if m.TRAITS.zero3))
#: Methods whose rank / alpha / dropout / target modules `rayft tune` searches.
TUNABLE_METHODS = tuple(name for name, m in METHODS.items() if m.TRAITS.tunable)


def method_module(name: str) -> ModuleType:
    return METHODS[name]


def traits(name: str) -> Traits:
    """The traits of method `name` (KeyError for an unknown one)."""
    return METHODS[name].TRAITS


def known_traits(name: object) -> Traits | None:
    """The traits of `name` if it is a method rayft knows (a manifest of an adapter made elsewhere may name none)."""
    module = METHODS.get(name) if isinstance(name, str) else None
    return module.TRAITS if module is not None else None


def method_problems(raw: dict) -> list[str]:
    """The cross-field problems of the raw job mapping's method: its own rules, then the rules its traits imply."""
    name = raw_get(raw, "method", "name")
    t = known_traits(name)
    if t is None:
        return []
    found = METHODS[name].problems(raw)
    strategy = raw_get(raw, "resources", "strategy")
    if strategy == "deepspeed_zero3" and not t.zero3 and not any(p.startswith("resources.strategy:") for p in found):
        found.append(
            f"resources.strategy: got 'deepspeed_zero3', which rayft runs for methods {', '.join(ZERO3_METHODS)}, "
            f"not {name}; use one of those methods, or strategy ddp for {name}"
        )
    return found
