"""Small ZeRO-3 job specs (every parameter sharded) for the DeepSpeed tests."""

from __future__ import annotations

from tests.support.jobs import make_job

ZERO3 = {"num_workers": 2, "strategy": "deepspeed_zero3"}

# The tiny model's parameters are all under DeepSpeed's default persistence threshold (1e5 elements), below
# which a parameter stays whole on every rank between steps. With 0, every parameter is really sharded, and an
# adapter saved without gathering would come out empty, as it does for a real model.
ALL_SHARDED = {"extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}


def zero3_job(model_dir, data, uri, method: dict, name: str, **sections):
    training = {"max_steps": 8, "checkpoint_every": 3, "eval_every": 8, "log_every": 4, "lr": 0.005,
                "micro_batch_size": 4, "seed": 0, **sections.pop("training", {})}
    return make_job(model_dir, data, uri, method, name=name, training=training,
                    resources={**ZERO3, **sections.pop("resources", {})}, deepspeed=ALL_SHARDED, **sections)
