"""Which model actor an evaluation runs (rayft's transformers engine, or vLLM's) and running items through a pool of
them on Ray Data. Above evaluation.generate (`ModelActor`, the items' shapes) and evaluation.vllm_actor
(`VllmActor`), which builds on generate.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

from evaluation.generate import ModelActor, ModelGroup
from evaluation.vllm_actor import VllmActor


def actor_class(settings: dict[str, Any]) -> type:
    """The model actor of the settings' engine: rayft's transformers engine, or vLLM's (evaluation/vllm_actor.py)."""
    if settings["engine"] == "vllm":
        return VllmActor
    return ModelActor


def run_group(group: ModelGroup, items: list[dict], settings: dict[str, Any], *, actors: int,
              progress: Callable[[int], None] | None = None) -> list[dict]:
    """Every item through Ray Data on `actors` model actors of `group`; results in any order."""
    import ray

    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    # rayft prints its own progress lines (`Progress`); Ray Data's bars would interleave with them.
    # Ray Data warns once per process that bars are off: that notice is spent here, unprinted.
    log_once("ray_data_progress_manager_disabled")
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    ds = ray.data.from_items([{"item": json.dumps(it)} for it in items], override_num_blocks=max(1, actors * 4))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options such as max_restarts here and has no named parameter for it yet.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            actor_class(settings), fn_constructor_kwargs={"group": group, "settings": settings}, batch_size=settings["batch_size"],
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=settings["cpus"],
            num_gpus=settings["gpus"] or None,
            # An actor that dies fails the evaluation with its error instead of being restarted; Ray's core
            # worker otherwise warns on the console that a restart could lose the actor's constructor arguments.
            max_restarts=0,
        )
    results = []
    for row in ds.iter_rows():
        results.append(json.loads(row["item"]))
        if progress is not None:
            progress(1)
    return results
