"""The objectives by name (see trainers/objectives/__init__.py): the table forward.py, runtime.py and the package read."""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

from trainers.objectives import dpo, kto, orpo, sft, simpo

OBJECTIVES: dict[str, ModuleType] = {
    "sft": sft,
    "dpo": dpo,
    "orpo": orpo,
    "simpo": simpo,
    "kto": kto,
}

#: The job spec's `objective:` field: one of the objective configs, chosen by `name`.
ObjectiveConfig = Annotated[Union[tuple(m.Config for m in OBJECTIVES.values())], Field(discriminator="name")]

#: Objectives trained on preference data (everything but next-token SFT).
PREFERENCE_OBJECTIVES = frozenset(name for name, m in OBJECTIVES.items() if m.DATA != "text")


def objective_module(name: str) -> ModuleType:
    return OBJECTIVES[name]
