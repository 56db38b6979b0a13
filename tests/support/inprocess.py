"""The worker loop in this process: `run_training(spec, fit=fit_in_process)` without Ray Train's actors.

A Ray Train run here pays ~30 CPU-seconds of start-up (the Train controller, its placement-group cleaner and
synchronization actor, a worker process importing torch, transformers and peft, Ray Data's split coordinator) before
a 12-step loop that takes 2 s. What the method x objective matrix asserts (trainable counts, loss falls, the published
artifact reloads in plain peft, a resumed run equals an uninterrupted one) is decided inside `trainers.loop.train_func`
and the driver around it, not by Ray Train, so those tests run the same `train_func` in the test's own process.

It runs under Ray Train's own local mode (`ray.train.v2` `LocalTrainFnUtils`, what `ScalingConfig(num_workers=0)`
uses: `ray.train.get_context`, `report`, `get_checkpoint` and `get_dataset_shard` answer in this process), with one
addition: local mode keeps a reported checkpoint where the worker wrote it (a temporary directory, gone after the
report), so here it is copied to `<storage>/runs/<run_id>/<dir>`, where Ray Train's controller puts it. Resume
(`trainers.checkpoints.newest_checkpoint` scans that folder) and publishing then read it as after a real run.

The train shard is the job's Ray Dataset itself (one worker: its whole shard), read through Ray Data on the
session's Ray; data still being preprocessed (`data.preprocess: during`) is read from the pass's files as workers do.
Real Ray Train keeps what only it shows: one run per strategy (single, DDP, ZeRO-3), a worker killed from outside and
restarted, Tune, the fine-tuning API and `rayft submit` (tests/integration/test_train.py, test_zero3.py, ...).
"""

from __future__ import annotations

import pyarrow.fs
import ray.train
from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, set_train_fn_utils

from storage.store import pyarrow_filesystem
from trainers.ingest.prepare import Prepared
from trainers.ingest.stream import trainer_datasets
from trainers.loop import train_func
from trainers.spec import JobSpec


class PersistingLocalUtils(LocalTrainFnUtils):
    """Ray Train's local-mode functions, with reported checkpoints persisted to the run's storage folder."""

    def __init__(self, storage_uri: str, run_id: str, dataset_shards: dict | None):
        super().__init__(experiment_name=run_id, dataset_shards=dataset_shards)
        self.fs, base = pyarrow_filesystem(storage_uri)
        self.run_dir = f"{base.rstrip('/')}/runs/{run_id}"
        self.reports = 0

    def report(self, metrics, checkpoint=None, checkpoint_dir_name=None, **kwargs) -> None:
        self.reports += 1
        if checkpoint is not None:
            dest = f"{self.run_dir}/{checkpoint_dir_name}"
            self.fs.create_dir(dest, recursive=True)
            pyarrow.fs.copy_files(checkpoint.path, dest, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=self.fs)
            checkpoint = ray.train.Checkpoint(dest, filesystem=self.fs)
        elif self._last_checkpoint is not None:
            checkpoint = self._last_checkpoint  # a report without a checkpoint keeps the last one (as Ray Train does)
        super().report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name, **kwargs)


def fit_in_process(spec: JobSpec, run_id: str, storage_uri: str, prepared: Prepared, faults: dict | None = None):
    """`trainers.run.Fit`: `train_func` of one worker in this process; a failure comes back as Ray Train's
    `WorkerGroupError`, as from a worker actor (`faults` with `crash_at_step` would exit this process: use
    `fail_at_step`)."""
    if spec.resources.num_workers != 1:
        raise ValueError("fit_in_process runs one worker; several need Ray Train (DDP, ZeRO-3)")
    if faults and "crash_at_step" in faults:
        raise ValueError("crash_at_step exits the process: in-process runs fail with fail_at_step instead")
    datasets = None if prepared.live else trainer_datasets(prepared, spec.training.seed)[0]
    for dataset in (datasets or {}).values():  # Ray Train's split keeps the order (trainer_datasets' DataConfig)
        dataset.context.execution_options.preserve_order = True
    utils = PersistingLocalUtils(storage_uri, run_id, datasets)
    set_train_fn_utils(utils)
    config = {"spec": spec, "storage_uri": storage_uri, "run_id": run_id, "faults": faults, "task_eval": None,
              "data": prepared.to_json()}
    try:
        train_func(config)
    except Exception as err:
        raise ray.train.WorkerGroupError(f"{type(err).__name__}: {err}", {0: err}) from err
    finally:
        set_train_fn_utils(None)
    return ray.train.Result(metrics=utils._get_last_metrics(), checkpoint=utils.get_checkpoint(), path=None, error=None)
