"""`rayft train` with an `eval:` gate fetches the run's checkpoint from storage once: the staged directory is what is
evaluated and what is published. Counted on the real S3 store (the embedded server), through a pyarrow filesystem
that passes every call to the store's own S3 filesystem and counts the files it opens."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pyarrow.fs
import pytest

from trainers.tiny import build_random_lora_dir, task_examples, write_jsonl

pytestmark = pytest.mark.slow


class CountingHandler(pyarrow.fs.FileSystemHandler):
    """Every call goes to `fs`; the paths of the files opened for reading are kept in `opened`."""

    def __init__(self, fs: pyarrow.fs.FileSystem):
        self.fs = fs
        self.opened: list[str] = []

    def __eq__(self, other):
        return isinstance(other, CountingHandler) and self.fs.equals(other.fs)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def test_a_gated_run_fetches_its_checkpoint_once(tmp_path, tiny_model_dir, ray_session, s3_server):
    import ray.train

    from evaluation.pipeline import gate_and_publish
    from storage.registry import open_registry
    from storage.runs import checkpoint_dir_name, run_prefix
    from storage.store import pyarrow_filesystem
    from tests.support.jobs import fresh_bucket, make_job
    from trainers.checkpoints import ADAPTER_DIR, STATE_NAME
    from trainers.eval_spec import EvalSpec
    from trainers.run import TrainResult
    from trainers.state_io import save_state

    storage = fresh_bucket(s3_server, "rayft-gate-once")
    # A run's final checkpoint as the trainer leaves it in storage: the adapter and the trainer state.
    local = tmp_path / "ckpt"
    build_random_lora_dir(tiny_model_dir, local / ADAPTER_DIR, seed=4)
    save_state({"step": 2, "history": [{"step": 2, "train_loss": 1.0, "eval_loss": 1.1}], "resumes": []}, local, STATE_NAME)
    run_id = f"gated-once-{uuid.uuid4().hex[:8]}"
    s3, base = pyarrow_filesystem(storage)
    path = f"{base.rstrip('/')}/{run_prefix(run_id)}/{checkpoint_dir_name(2)}"
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=s3)
    counting = CountingHandler(s3)
    checkpoint = ray.train.Checkpoint(path, filesystem=pyarrow.fs.PyFileSystem(counting))
    result = TrainResult(run_id=run_id, metrics={"step": 2, "eval_loss": 1.1}, checkpoint_path=f"s3://{path}",
                         checkpoint=checkpoint, model_dir=str(tiny_model_dir))

    heldout = write_jsonl(task_examples("reverse", 4, seed=9), tmp_path / "heldout.jsonl")
    spec = make_job(tiny_model_dir, heldout, storage, {"name": "lora", "r": 4, "alpha": 8}, name="gated-once")
    spec = spec.model_copy(update={
        "eval": EvalSpec.model_validate({"data": str(heldout), "metrics": ["exact_match"], "max_tokens": 2,
                                         "compare_base": False}),
        "output": spec.output.model_copy(update={"require": {"exact_match": ">= 0"}}),
    })
    gate_and_publish(spec, result)

    adapter_reads = [p for p in counting.opened if p.endswith(f"{ADAPTER_DIR}/adapter_model.safetensors")]
    state_reads = [p for p in counting.opened if p.endswith(f"{STATE_NAME}.safetensors")]
    assert (len(adapter_reads), len(state_reads)) == (1, 1), counting.opened
    # What was evaluated is what is published: the checkpoint's adapter, with the gate's results in the manifest.
    manifest = open_registry(storage).resolve("gated-once")
    published = {e.path: e.sha256 for e in manifest.files}
    assert published["adapter_model.safetensors"] == hashlib.sha256(
        (local / ADAPTER_DIR / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert {"history.json", "loss_curve.png", "adapter_config.json"} <= set(published)
    assert manifest.metrics["eval"]["metrics"] and manifest.traits is not None
    assert Path(result.checkpoint_path).name == checkpoint_dir_name(2)
