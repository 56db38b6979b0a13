"""The `target_modules` field shared by the methods that wrap linear layers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

#: `default` = peft's per-architecture default (q_proj + v_proj for Llama, as in the LoRA
#: paper); `all-linear` = every linear layer but the output head; or explicit module names.
TargetModules = Literal["default", "all-linear"] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


def peft_target_modules(value: TargetModules) -> str | list[str] | None:
    """What peft's `target_modules` takes: None lets peft pick its per-architecture default."""
    if value == "default":
        return None
    return value
