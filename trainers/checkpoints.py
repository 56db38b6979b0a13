"""A run's checkpoints: how the newest complete one is found, and what they hold.

Their place in storage is named by storage.runs (`<storage>/runs/<run_id>/step-XXXXXXXX/`); each holds
  - `trainer_state.{json,safetensors}`: step, loss history, resumes, every rank's RNG state (and, single/DDP,
    the optimizer and schedule; ZeRO-3 keeps those in its own shards);
  - `adapter/` (a peft directory) or `model/` (a transformers directory): what trains, in single/DDP
    checkpoints, and gathered from the shards in a ZeRO-3 run's final one;
  - `probe.{json,safetensors}` in the final checkpoint: the model's logits on one example, so a published
    artifact can be checked against the model as it was at the end of training;
  - ZeRO-3 only: `zero3/` (DeepSpeed's per-rank shards) and `shards.json`, rank 0's list of every rank's files.
Used by the worker loop (resume), `trainers.run` (final checkpoint), tune and publishing.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# The trainer state's files and the checkpoint folders' names are storage.runs' (re-exported for the trainers).
from storage.runs import STATE_FILES, STATE_NAME, checkpoint_dir_name, checkpoint_step, run_prefix  # noqa: F401
from storage.store import pyarrow_filesystem

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
PROBE_NAME = "probe"
#: In a checkpoint that several ranks write (DeepSpeed ZeRO-3 shards), rank 0's list of every rank's files and
#: sizes: the checkpoint is complete only once all of them are in storage.
SHARDS_NAME = "shards.json"
#: DeepSpeed's checkpoint tag: its shard files sit in `step-XXXXXXXX/zero3/`.
ZERO3_TAG = "zero3"


def dir_name(step: int) -> str:
    """The directory name of the checkpoint of optimizer step `step`."""
    return checkpoint_dir_name(step)


def step_of(name: str) -> int:
    """The step a checkpoint directory name stands for; -1 for any other name."""
    return checkpoint_step(name)


def newest_checkpoint(config: dict):
    """The newest complete checkpoint of this run (a `ray.train.Checkpoint`), or None.

    Ray Train registers a reported checkpoint when its controller next polls the workers;
    a worker that dies right after reporting can lose that registration although the files
    are already in storage. So the run's storage is scanned too, and the newer one wins.
    """
    import ray.train

    candidates: list[tuple[int, object]] = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((step_of(Path(registered.path).name), registered))
    if config.get("storage_uri") and config.get("run_id"):
        candidates += stored_checkpoints(config["storage_uri"], config["run_id"])
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def stored_checkpoints(storage_uri: str, run_id: str) -> list[tuple[int, object]]:
    """(step, `ray.train.Checkpoint`) of every complete checkpoint of the run found in its storage."""
    import pyarrow.fs
    import ray.train

    fs, base = pyarrow_filesystem(storage_uri)
    run_dir = f"{base.rstrip('/')}/{run_prefix(run_id)}"
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and step_of(info.base_name) >= 0 and checkpoint_complete(fs, info.path):
            found.append((step_of(info.base_name), ray.train.Checkpoint(info.path, filesystem=fs)))
    return found


def checkpoint_complete(fs, path: str) -> bool:
    """All files of the checkpoint at `path` are in storage: the trainer state, and every file `shards.json` lists."""
    import pyarrow.fs

    File = pyarrow.fs.FileType.File
    state = fs.get_file_info([f"{path}/{STATE_FILES[0]}", f"{path}/{STATE_FILES[1]}", f"{path}/{SHARDS_NAME}"])
    if not all(f.type == File for f in state[:2]):
        return False
    if state[2].type != File:
        return True
    listing = read_shards_listing(fs, path)
    expected = {rel: size for files in listing["files"].values() for rel, size in files.items()}
    found = fs.get_file_info([f"{path}/{rel}" for rel in expected])
    return all(f.type == File and f.size == size for f, size in zip(found, expected.values()))


def read_shards_listing(fs, path: str) -> dict:
    with fs.open_input_stream(f"{path}/{SHARDS_NAME}") as stream:
        return json.loads(stream.read())


@contextlib.contextmanager
def local_parts(checkpoint, parts: list[str] | tuple[str, ...]) -> Iterator[Path]:
    """A local directory with `parts` (files or directories, relative; missing ones skipped) of `checkpoint`
    (a `ray.train.Checkpoint`): the checkpoint itself on a local filesystem, else a download of those parts
    alone (a ZeRO-3 checkpoint's other shards can be many times the model's size)."""
    import pyarrow.fs

    fs, base = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        yield Path(base)
        return
    local = pyarrow.fs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-parts-") as tmp:
        for part, info in zip(parts, fs.get_file_info([f"{base}/{p}" for p in parts])):
            if info.type == pyarrow.fs.FileType.NotFound:
                continue
            (Path(tmp) / part).parent.mkdir(parents=True, exist_ok=True)
            if info.type == pyarrow.fs.FileType.Directory:
                Path(tmp, part).mkdir()
            pyarrow.fs.copy_files(info.path, f"{tmp}/{part}", source_filesystem=fs, destination_filesystem=local)
        yield Path(tmp)


@contextlib.contextmanager
def resume_checkpoint(config: dict) -> Iterator[Path | None]:
    """The newest complete checkpoint of this run as a local directory, or None."""
    newest = newest_checkpoint(config)
    if newest is None:
        yield None
        return
    with newest.as_directory() as local:
        yield Path(local)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
    }


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def unwrap(model):
    """The model inside a DDP wrapper (a PeftModel is left as it is)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def save_weights(model, directory: Path, is_adapter: bool, state_dict: dict | None = None) -> None:
    """What trains, as a peft (`adapter/`) or transformers (`model/`) directory; `state_dict`: weights gathered
    elsewhere (ZeRO-3), instead of the model's own."""
    target = directory / (ADAPTER_DIR if is_adapter else MODEL_DIR)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    unwrap(model).save_pretrained(target, safe_serialization=True, **extra)


def load_trainable_weights(model, directory: Path, is_adapter: bool) -> None:
    """Restore what trains from a checkpoint (adapter weights, or the whole model)."""
    from safetensors.torch import load_file

    inner = unwrap(model)
    if is_adapter:
        import peft

        weights = load_file(str(directory / ADAPTER_DIR / "adapter_model.safetensors"))
        peft.set_peft_model_state_dict(inner, weights)
    else:
        state = {}
        for f in sorted((directory / MODEL_DIR).glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = inner.load_state_dict(state, strict=False)
        tied = set(getattr(inner, "_tied_weights_keys", None) or [])
        if unexpected or (set(missing) - tied):
            raise RuntimeError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")
