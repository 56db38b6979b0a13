"""DeepSpeed ZeRO-3 on a real local Ray Train with 2 CPU workers (gloo): full fine-tuning and LoRA.

Two runs carry the slow assertions: a full fine-tune in which rank 1 is killed mid-run (sharding, resume step,
loss, the published model against the sharded checkpoint), and a LoRA run (the published adapter is the real
gathered one). The config generator and the `deepspeed.extra` rules are checked without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from storage.registry import open_registry
from tests.support.jobs import make_job
from trainers.checkpoints import PROBE_NAME, SHARDS_NAME, STATE_NAME, checkpoint_complete
from trainers.spec import DEEPSPEED_OWNED_KEYS, DEEPSPEED_OWNED_ZERO_KEYS, SpecError
from trainers.state_io import load_state
from tests.support.zero3 import ALL_SHARDED, ZERO3, zero3_job



def base_eval_loss(spec, model_dir) -> float:
    from transformers import AutoTokenizer

    from trainers.ingest.prepare import prepare_for_job
    from trainers.ingest.stream import read_examples
    from trainers.loop import mean_loss
    from trainers.precision import Precision

    tok = AutoTokenizer.from_pretrained(model_dir)
    _, prepared = prepare_for_job(spec, spec.storage.uri)  # the run's own preprocessed data (reused)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return mean_loss(model, read_examples(prepared), 4, tok.pad_token_id, torch.device("cpu"), Precision("fp32", torch.float32, None))


def fp32_weights_from_shards(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights, gathered from every rank's optimizer shard by DeepSpeed's own offline tool."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="zero3")


def assert_sharded(share: dict, total: int, world: int = 2) -> None:
    assert share["total"] == total
    assert share["partition"] / total == pytest.approx(1 / world, abs=0.01)
    assert share["gathered"] == 0  # nothing whole left on the rank between steps


# ----------------------------------------------------------------------------- with Ray Train


@pytest.mark.slow
def test_full_zero3_shards_resumes_after_rank_killed_and_publishes(ray_session, tiny_model_dir, reverse_data, s3_uri, tmp_path):
    """Base model, checkpoints and registry all in S3: each rank uploads its shard, and after the crash
    each downloads only its own shard to resume."""
    from storage.store import open_store
    from trainers.publish import checkpoint_for_publishing
    from trainers.run import run_training

    model_uri = f"{s3_uri}/models/tiny"
    for f in tiny_model_dir.iterdir():
        open_store(model_uri).put_file(f, f.name)
    spec = zero3_job(model_uri, reverse_data, s3_uri, {"name": "full"}, "rev-full-z3", resources={"max_failures": 1})
    before = base_eval_loss(spec, tiny_model_dir)
    marker = tmp_path / "crashed"

    result = run_training(spec, faults={"crash_at_step": 5, "rank": 1, "marker": str(marker)})

    assert marker.read_text() == "5"  # rank 1's process really exited at step 5
    assert checkpoint_complete(result.checkpoint.filesystem, result.checkpoint.path)
    with checkpoint_for_publishing(result.checkpoint) as published_parts:
        assert (published_parts / "model" / "model.safetensors").is_file() and not (published_parts / "zero3").exists()
    ckpt = Path(result.checkpoint.to_directory(str(tmp_path / "final")))
    state = load_state(ckpt, STATE_NAME)
    assert state["resumes"] == [3] and state["step"] == 8 == result.metrics["step"]  # from the step-3 shards, not 0
    # Every rank holds half of the parameters, after zero.Init and after training.
    total = result.metrics["total_params"]
    assert total == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    for share in state["zero3"]["after_init"] + state["zero3"]["now"]:
        assert_sharded(share, total)
    assert state["zero3"]["deepspeed_ops"] == []  # no C++ op was compiled or loaded: CI pays no JIT build
    # Each checkpoint holds both ranks' DeepSpeed shards, listed in shards.json.
    listing = json.loads((ckpt / SHARDS_NAME).read_text())
    assert listing["world_size"] == 2
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in name and name.endswith("optim_states.pt") for name in listing["files"][str(rank)])

    # The loss fell.
    assert result.metrics["eval_loss"] < before - 0.05, (before, result.metrics["eval_loss"])
    # The published model is a plain transformers directory; its weights are the ones training ended with.
    manifest = result.manifests[0]
    assert (manifest.kind, manifest.method) == ("model", "full")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.path for f in manifest.files}
    published_dir = open_registry(s3_uri).download(spec.output.name)
    published = AutoModelForCausalLM.from_pretrained(published_dir)
    master = fp32_weights_from_shards(ckpt)
    state_dict = published.state_dict()
    assert set(master) == set(state_dict)
    for name, tensor in master.items():
        assert torch.equal(state_dict[name], tensor), name
    probe = load_state(ckpt, PROBE_NAME)
    with torch.no_grad():
        logits = published(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_lora_zero3_publishes_the_gathered_adapter(ray_session, tiny_model_dir, reverse_data, local_uri):
    spec = zero3_job(tiny_model_dir, reverse_data, local_uri, {"name": "lora", "r": 4, "alpha": 8}, "rev-lora-z3",
                     training={"max_steps": 6, "checkpoint_every": 6, "eval_every": 6, "lr": 0.01})
    from trainers.run import run_training

    result = run_training(spec)

    ckpt = Path(result.checkpoint.path)
    for share in load_state(ckpt, STATE_NAME)["zero3"]["now"]:
        assert_sharded(share, result.metrics["total_params"])
    adapter_dir = open_registry(local_uri).download(spec.output.name)
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    reference = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    expected_shapes = {k.replace(".default", ""): tuple(p.shape) for k, p in reference.named_parameters() if p.requires_grad}
    assert {k: tuple(v.shape) for k, v in adapter.items()} == expected_shapes  # every tensor, none empty
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at zero: it trained
    master = fp32_weights_from_shards(ckpt)
    for name, tensor in adapter.items():
        assert torch.equal(tensor, master[name.replace(".weight", ".default.weight")]), name
    # Plain peft on the base reproduces the model as training ended.
    probe = load_state(ckpt, PROBE_NAME)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)


def _local_fs():
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


# ----------------------------------------------------------------------------- without Ray


def test_deepspeed_config_comes_from_the_spec(tiny_model_dir, reverse_data, local_uri):
    from deepspeed.runtime.config import DeepSpeedConfig

    from trainers.deepspeed import deepspeed_config

    spec = make_job(tiny_model_dir, reverse_data, local_uri, {"name": "full"}, name="cfg",
                    training={"micro_batch_size": 3, "grad_accum": 5, "max_grad_norm": 0.5, "lr": 1e-4, "weight_decay": 0.1},
                    resources=ZERO3, deepspeed={"offload_optimizer": True, "extra": {
                        "zero_optimization": {"stage3_max_live_parameters": 12345}, "wall_clock_breakdown": True}})
    cfg = deepspeed_config(spec, world_size=4, device=torch.device("cpu"))
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (3, 5, 60)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.999],
                                                             "eps": 1e-8, "torch_adam": False}}
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]  # precision auto on CPU is fp32
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "none"
    assert zero["stage3_max_live_parameters"] == 12345 and cfg["wall_clock_breakdown"] is True
    assert "scheduler" not in cfg  # the transformers schedule is handed to deepspeed.initialize
    # DeepSpeed reads it as meant (its own parser; one rank here, so the batch is sized for one).
    parsed = DeepSpeedConfig(deepspeed_config(spec, world_size=1, device=torch.device("cpu")))
    assert (parsed.zero_optimization_stage, parsed.gradient_clipping, parsed.train_batch_size) == (3, 0.5, 15)
    assert parsed.zero_config.max_live_parameters == 12345 and parsed.zero_config.offload_optimizer.device == "cpu"
    # Without offload, the optimizer is torch's AdamW: nothing for DeepSpeed to compile.
    plain = make_job(tiny_model_dir, reverse_data, local_uri, {"name": "full"}, name="cfg", resources=ZERO3)
    assert deepspeed_config(plain, 2, torch.device("cpu"))["optimizer"]["params"]["torch_adam"] is True


def test_every_key_rayft_sets_is_protected_from_extra(tiny_model_dir, reverse_data, local_uri):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from trainers.deepspeed import deepspeed_config

    spec = make_job(tiny_model_dir, reverse_data, local_uri, {"name": "full"}, name="cfg", resources=ZERO3)
    cfg = deepspeed_config(spec, 2, torch.device("cpu"))
    assert set(cfg) - {"zero_optimization"} <= set(DEEPSPEED_OWNED_KEYS)
    fields = DeepSpeedZeroConfig.model_fields
    alias = {f.alias: name for name, f in fields.items() if f.alias}
    assert {alias.get(k, k) for k in cfg["zero_optimization"]} == set(DEEPSPEED_OWNED_ZERO_KEYS)


@pytest.mark.parametrize("extra, problems", [
    ({"gradient_clipping": 2.0}, ["deepspeed.extra.gradient_clipping: set by rayft from training.max_grad_norm"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["deepspeed.extra.scheduler: set by rayft from training.schedule"]),
    ({"bf16": {"enabled": True}}, ["deepspeed.extra.bf16: set by rayft from training.precision"]),
    ({"gradient_cliping": 2.0}, ["deepspeed.extra.gradient_cliping: not a DeepSpeed config key; did you mean 'gradient_clipping'?"]),
    ({"zero_optimization": {"stage": 2}}, ["deepspeed.extra.zero_optimization.stage: set by rayft to 3"]),
    ({"zero_optimization": {"cpu_offload": True}},  # DeepSpeed's deprecated name for offload_optimizer
     ["deepspeed.extra.zero_optimization.cpu_offload: set by rayft from deepspeed.offload_optimizer"]),
    ({"zero_optimization": {"gather_16bit_weights_on_model_save": False}},  # the field name behind our alias
     ["deepspeed.extra.zero_optimization.gather_16bit_weights_on_model_save: set by rayft to true"]),
    ({"zero_optimization": {"stage3_max_live_paramters": 1}},
     ["deepspeed.extra.zero_optimization.stage3_max_live_paramters: not a DeepSpeed ZeRO setting; did you mean 'stage3_max_live_parameters'?"]),
    ({"zero_optimization": {"stage3_max_live_parameters": "many"}},
     ["deepspeed.extra.zero_optimization.stage3_max_live_parameters: got 'many', input should be a valid integer"]),
    ({"zero_optimization": 3}, ["deepspeed.extra.zero_optimization: got 3, must be a mapping of ZeRO settings"]),
    ({"optimizer": {}, "zero_optimization": {"offload_param": {"device": "cpu"}}, "fp16": {}},  # all at once
     ["deepspeed.extra.optimizer: set by rayft", "deepspeed.extra.fp16: set by rayft",
      "deepspeed.extra.zero_optimization.offload_param: set by rayft from deepspeed.offload_params"]),
])
def test_extra_keys_are_validated_never_override_ours(extra, problems, tiny_model_dir, reverse_data, local_uri):
    with pytest.raises(SpecError) as err:
        make_job(tiny_model_dir, reverse_data, local_uri, {"name": "full"}, name="bad", resources=ZERO3, deepspeed={"extra": extra})
    assert len(err.value.problems) == len(problems), err.value.problems
    for expected, got in zip(sorted(problems), sorted(err.value.problems)):
        assert got.startswith(expected), (got, expected)


def test_zero3_runs_only_methods_it_gathers(tiny_model_dir, reverse_data, local_uri):
    with pytest.raises(SpecError, match="deepspeed_zero3', which rayft runs for methods full, lora, rslora, not ia3"):
        make_job(tiny_model_dir, reverse_data, local_uri, {"name": "ia3"}, resources=ZERO3)
    assert make_job(tiny_model_dir, reverse_data, local_uri, {"name": "rslora"}, resources=ZERO3).resolved_strategy() == "deepspeed_zero3"


def test_checkpoint_is_complete_only_with_every_ranks_files(tmp_path):
    from trainers.state_io import save_state

    step = tmp_path / "step-00000003"
    (step / "zero3").mkdir(parents=True)
    save_state({"step": 3}, step, STATE_NAME)
    (step / "zero3" / "rank0.pt").write_bytes(b"0" * 10)
    files = {"0": {"zero3/rank0.pt": 10, f"{STATE_NAME}.json": (step / f"{STATE_NAME}.json").stat().st_size},
             "1": {"zero3/rank1.pt": 7}}
    (step / SHARDS_NAME).write_text(json.dumps({"world_size": 2, "tag": "zero3", "files": files}))
    fs = _local_fs()
    assert not checkpoint_complete(fs, str(step))  # rank 1's shard has not arrived
    (step / "zero3" / "rank1.pt").write_bytes(b"1" * 3)
    assert not checkpoint_complete(fs, str(step))  # ... only part of it
    (step / "zero3" / "rank1.pt").write_bytes(b"1" * 7)
    assert checkpoint_complete(fs, str(step))
    (step / f"{STATE_NAME}.safetensors").unlink()
    assert not checkpoint_complete(fs, str(step))
