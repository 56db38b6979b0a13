"""What a fine-tuning method is, declared by its own module (`TRAITS`), so no code elsewhere compares method names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from storage.registry import ArtifactTraits


@dataclass(frozen=True)
class Traits:
    #: What a run publishes: a peft adapter directory, or a whole transformers model.
    produces: Literal["adapter", "model"]
    #: Runs under strategy deepspeed_zero3 (the adapter, if any, is gathered from the shards at the end).
    zero3: bool
    #: `rayft tune` can search its rank / alpha / dropout / target modules (the LoRA-family fields).
    tunable: bool
    #: How a published adapter serves: multiplexed beside others on one base, only merged into the base
    #: first, or not at all (prompt-learning methods live in the prompt, not the weights).
    serving: Literal["multiplexed", "merged", "none"]
    #: Adapters of this method can share one forward batch with other adapters (peft's mixed batch).
    mixes_in_batch: bool
    #: The base is loaded 4-bit: ZeRO-3 cannot shard it and a merge dequantizes it first.
    quantized_base: bool = False
    #: Trains virtual tokens prepended to the prompt rather than weights.
    prompt_learning: bool = False
    #: The spec field that holds the adapter's rank (`rayft plan --rank` sets it); None: no rank.
    rank_field: str | None = None
    #: DDP must look for parameters without gradients in a step (AdaLoRA masks ranks out as it trains).
    ddp_find_unused_parameters: bool = False

    @property
    def is_adapter(self) -> bool:
        return self.produces == "adapter"

    def for_manifest(self) -> ArtifactTraits:
        """What the publisher records in the manifest, for serving and evaluation to read across the trainers|serve
        wall."""
        return ArtifactTraits(serving=self.serving, mixes_in_batch=self.mixes_in_batch, prompt_learning=self.prompt_learning)

    @property
    def many_workers_strategy(self) -> str:
        """What strategy `auto` means for this method on several workers: a whole model shards (ZeRO-3),
        an adapter over a replicated base data-parallelizes (DDP)."""
        return "deepspeed_zero3" if self.produces == "model" else "ddp"


def no_problems(raw: dict) -> list[str]:
    """The `problems(raw)` hook of a method without cross-field rules."""
    return []


def no_step_hook(model, step: int) -> None:
    """The `after_optimizer_step(model, step)` hook of a method with nothing to do between steps."""
