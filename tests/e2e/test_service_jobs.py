"""The fine-tuning jobs API end to end: the unmodified `openai` client against `rayft serve` on a Ray
head of its own (token auth, dashboard = Jobs API), storage in the embedded S3 server.

Every job is a real Ray job running `rayft train`; the Serve app is deployed by the real CLI
(`rayft serve SPEC --address HEAD --detach`), as a platform team would. One head and one app
for the module; the trainings are a few steps of LoRA on the tiny model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml

from storage.local_s3 import s3_env
from storage.registry import open_registry
from tests.support.jobs import fresh_bucket, registry_with_base
from tests.support.ray_head import Head, free_port, running_head
from trainers.tiny import task_examples

TOKENS = {"acme": "acme-secret-token", "globex": "globex-secret-token"}
LOOP_STEPS = 4
PROMPT = [{"role": "user", "content": "reverse apple ="}]


def _chat_rows(n: int, seed: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"].strip()}]}
            for r in task_examples("reverse", n, seed=seed)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@dataclass
class Deployed:
    url: str
    head: Head
    storage: str
    app: str

    def client(self, tenant: str = "acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKENS[tenant], max_retries=0, timeout=60)


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def deployed(s3_server, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Deployed]:
    storage = fresh_bucket(s3_server, "rayft-ftapi")
    registry_with_base(storage, tiny_model_dir)
    work = tmp_path_factory.mktemp("ftapi")
    spec = {
        "storage": storage,
        "base": {"name": "tiny", "source": "registry:tiny", "deployment": {"cpus": 0.5}},
        "api": {"auth": {"tenants": [{"name": t, "token_sha256": [hashlib.sha256(v.encode()).hexdigest()]} for t, v in TOKENS.items()]},
                "deployment": {"cpus": 0.1}},
        "fine_tuning": {"max_concurrent_jobs": 1, "poll_interval_s": 1,
                        "defaults": {"learning_rate": 0.01, "max_seq_len": 32, "cpus_per_worker": 1, "max_failures": 1,
                                     "method": {"name": "lora", "r": 4, "alpha": 8}}},
    }
    (work / "serve.yaml").write_text(yaml.safe_dump(spec))
    # The cluster holds the storage settings, as a real one does (pod env / instance identity).
    with running_head(num_cpus=3, env=s3_env(s3_server.endpoint_url)) as head:
        port, app = free_port(), "ftapi"
        deploy = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "serve", str(work / "serve.yaml"), "--address", head.gcs_address,
             "--port", str(port), "--name", app, "--detach"],
            env=head.env(), capture_output=True, text=True, timeout=300,
        )
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        assert "fine-tuning API" in deploy.stdout
        yield Deployed(url=f"http://127.0.0.1:{port}", head=head, storage=storage, app=app)


def _finished(client: openai.OpenAI, job_id: str):
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def _peft_greedy(storage: str, model: str, n: int) -> list[int]:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = open_registry(storage)
    base_dir, adapter_dir = registry.download("tiny"), registry.download(model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    ids = torch.tensor([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _chat_tokens(client: openai.OpenAI, model: str, n: int) -> list[int]:
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=n, temperature=0,
                                           extra_body={"return_token_ids": True})
    return reply.choices[0].model_extra["token_ids"]


def _restart_api_replica(head: Head, app: str) -> None:
    """SIGKILL the API (ingress) replica's process; Serve starts a new one. Returns once the new one is alive."""
    script = f"""
import os, signal, time, ray
import ray._private.state
ray.init(address={head.gcs_address!r}, logging_level="ERROR")
def ingress():
    return [a for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and "OpenAIIngress" in a["ActorClassName"] and {app!r} in a["ActorClassName"]]
before = ingress()
assert len(before) == 1, [(a["ActorClassName"], a["Name"], a["State"]) for a in ray._private.state.actors().values()]
os.kill(before[0]["Pid"], signal.SIGKILL)
deadline = time.time() + 240
while time.time() < deadline and [a["ActorID"] for a in ingress()] in ([], [before[0]["ActorID"]]):
    time.sleep(0.5)
print("replaced", before[0]["Pid"], "by", [a["Pid"] for a in ingress()])
"""
    done = subprocess.run([sys.executable, "-c", script], env=head.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "replaced" in done.stdout, done.stderr[-3000:]


def _kill_train_worker(head: Head) -> int:
    """SIGKILL the Ray Train worker of this head's job (found by the head's token in its environment)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.environ().get("RAY_AUTH_TOKEN") == head.token:
                p.kill()
                return p.pid
        except (psutil.Error, OSError):
            continue
    pytest.fail("no Ray Train worker of this head is running")


@pytest.mark.slow
def test_the_full_loop_queue_restart_cancel_and_tenants(deployed: Deployed) -> None:
    acme, globex = deployed.client("acme"), deployed.client("globex")
    training = acme.files.create(file=("reverse.jsonl", _chat_rows(48, seed=1)), purpose="fine-tune")
    t0 = time.monotonic()
    job = acme.fine_tuning.jobs.create(
        model="tiny", training_file=training.id, suffix="loop", seed=7, hyperparameters={"n_epochs": 1, "batch_size": 8},
        extra_body={"rayft": {"max_steps": LOOP_STEPS, "checkpoints": 2}},
    )
    assert job.status in ("queued", "validating_files", "running"), job.error
    assert job.model == "tiny" and job.seed == 7
    # A second job waits behind the first (max_concurrent_jobs: 1), and a third is cancelled while queued.
    long_job = acme.fine_tuning.jobs.create(model="tiny", training_file=training.id,
                                            extra_body={"rayft": {"max_steps": 3000, "checkpoints": 100}})
    queued = acme.fine_tuning.jobs.create(model="tiny", training_file=training.id)
    assert acme.fine_tuning.jobs.retrieve(long_job.id).status == "queued"
    assert acme.fine_tuning.jobs.cancel(queued.id).status == "cancelled"

    # Another tenant sees none of it: not in its list, and each id answers 404 like a missing one.
    assert [j.id for j in globex.fine_tuning.jobs.list()] == []
    for call in (lambda: globex.fine_tuning.jobs.retrieve(job.id), lambda: globex.fine_tuning.jobs.cancel(job.id),
                 lambda: globex.fine_tuning.jobs.list_events(job.id), lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: globex.fine_tuning.jobs.retrieve("ftjob-" + "0" * 24)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError, match="training_file"):
        globex.fine_tuning.jobs.create(model="tiny", training_file=training.id)

    done = _wait_for(lambda: _finished(acme, job.id), 900, "the loop job to finish")
    assert done.status == "succeeded", done.error
    model = done.fine_tuned_model
    assert model.startswith("ft.acme.loop.") and done.trained_tokens and done.trained_tokens > 0 and done.finished_at
    answer = acme.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)
    create_to_answer_s = time.monotonic() - t0
    print(f"\n[loop] {model}: {answer.choices[0].message.content!r}; create -> first answer {create_to_answer_s:.1f}s")
    assert _chat_tokens(acme, model, 8) == _peft_greedy(deployed.storage, model, 8)
    assert model in [m.id for m in acme.models.list()] and model not in [m.id for m in globex.models.list()]
    with pytest.raises(openai.NotFoundError):
        globex.chat.completions.create(model=model, messages=PROMPT, max_tokens=4)
    events = list(acme.fine_tuning.jobs.list_events(job.id, limit=100))
    progress = [e for e in events if e.type == "metrics"]
    assert progress and progress[0].data["step"] == LOOP_STEPS and "train_loss" in progress[0].data
    assert any("successfully completed" in e.message for e in events)
    checkpoints = list(acme.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [LOOP_STEPS, LOOP_STEPS // 2]
    assert checkpoints[0].fine_tuned_model_checkpoint.split("@")[0] == model
    assert checkpoints[1].metrics.train_loss is not None
    early = checkpoints[1].fine_tuned_model_checkpoint
    assert acme.completions.create(model=early, prompt="reverse apple =", max_tokens=4, temperature=0).choices

    # The long job starts once the slot is free. A killed worker is replaced and the run resumes from its
    # newest checkpoint; then a restart of the API replica loses no record.
    _wait_for(lambda: list(acme.fine_tuning.jobs.checkpoints.list(long_job.id)), 600, "the long job's first checkpoint")
    killed = _kill_train_worker(deployed.head)
    resumed = _wait_for(lambda: [e for e in acme.fine_tuning.jobs.list_events(long_job.id, limit=1000)
                                 if e.message.startswith("resumed from checkpoint at step")], 300, f"a resume after killing pid {killed}")
    assert int(resumed[0].message.rsplit(" ", 1)[1]) >= 30
    assert acme.fine_tuning.jobs.retrieve(long_job.id).status == "running"
    _restart_api_replica(deployed.head, deployed.app)
    _wait_for(lambda: httpx.get(f"{deployed.url}/health", timeout=5).status_code == 200, 300, "the new API replica")
    after = {j.id: j for j in acme.fine_tuning.jobs.list()}
    assert after[job.id].status == "succeeded" and after[job.id].fine_tuned_model == model
    assert after[queued.id].status == "cancelled" and after[long_job.id].status == "running"

    cancelled = acme.fine_tuning.jobs.cancel(long_job.id)
    assert cancelled.id == long_job.id
    final = _wait_for(lambda: _finished(acme, long_job.id), 300, "the cancelled job to stop")
    assert final.status == "cancelled" and final.fine_tuned_model is None
    planned = final.model_extra["rayft"]["fine_tuned_model_planned"]
    assert open_registry(deployed.storage).versions(planned) == []
    assert deployed.head.client().status(long_job.id) == "STOPPED"


@pytest.mark.slow
def test_a_bad_job_request_lists_every_problem(deployed: Deployed) -> None:
    acme = deployed.client("acme")
    with pytest.raises(openai.BadRequestError) as info:
        acme.fine_tuning.jobs.create(
            model="no-such-base", training_file="file-../../etc", validation_file="file-" + "1" * 24, suffix="Bad Suffix!",
            hyperparameters={"n_epochs": 0, "batch_size": "many"}, method={"type": "rlhf"},
            extra_body={"rayft": {"workers": 0, "colour": "blue"}},
        )
    message = info.value.message
    for part in ("model: got 'no-such-base'", "training_file: got 'file-../../etc'", "validation_file: no file",
                 "suffix: got 'Bad Suffix!'", "hyperparameters.n_epochs", "hyperparameters.batch_size", "method.type: got 'rlhf'",
                 "rayft.workers", "rayft.colour"):
        assert part in message, part
    assert [j.id for j in deployed.client("globex").fine_tuning.jobs.list()] == []


@pytest.mark.slow
def test_a_dpo_job_trains_the_preference_objective_on_openai_pairs(deployed: Deployed) -> None:
    """`method: {"type": "dpo"}` on a file in OpenAI's preference shape = rayft's `objective: dpo` (beta as asked)."""
    acme = deployed.client("acme")
    rows = [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
             "preferred_output": [{"role": "assistant", "content": r["completion"].strip()}],
             "non_preferred_output": [{"role": "assistant", "content": r["completion"].strip()[::-1]}]}
            for r in task_examples("reverse", 20, seed=2)]
    pairs = acme.files.create(file=("pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:16]).encode()), purpose="fine-tune")
    assert pairs.model_extra["format"] == "preference" and pairs.model_extra["rows"] == 16
    # A validation file of its own: 16 rows may hash no row into a 10% held-out split (then the job fails, saying so).
    held_out = acme.files.create(file=("held.jsonl", "".join(json.dumps(r) + "\n" for r in rows[16:]).encode()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model="tiny", training_file=pairs.id, validation_file=held_out.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}},
        extra_body={"rayft": {"max_steps": 2, "checkpoints": 1}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = _wait_for(lambda: _finished(acme, job.id), 900, "the DPO job to finish")
    assert done.status == "succeeded", done.error
    manifest = open_registry(deployed.storage).resolve(done.fine_tuned_model)
    assert manifest.params["objective"]["name"] == "dpo" and manifest.params["objective"]["beta"] == 0.2
    assert acme.chat.completions.create(model=done.fine_tuned_model, messages=PROMPT, max_tokens=4, temperature=0).choices
