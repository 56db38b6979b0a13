"""Fine-tuning methods, registered by name.

Each method is one module of the same shape:
  - `Config`: its pydantic config (`name: Literal[...]` is the discriminator in the job spec);
  - `quantization_config(cfg, compute_dtype)`: a transformers quantization config for the base, or None;
  - `peft_config(cfg, total_steps)`: the peft config to wrap the base with, or None (full fine-tuning).
Adding a method is adding one module and one line below.
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

from trainers.methods import adalora, dora, full, ia3, lora, prefix_tuning, qlora, rslora

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
ADAPTER_METHODS = frozenset(name for name in METHODS if name != "full")


def method_module(name: str) -> ModuleType:
    return METHODS[name]
