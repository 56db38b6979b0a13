"""The composed application (service/): inference + /v1/files on one Serve app, with tenants.

One application for the module on the session's Serve, storage in a bucket of the embedded
S3 server, driven with the unmodified `openai` client (and httpx for malformed bodies).
No fine-tuning job runs here (tests/e2e/test_service_jobs.py does, on a Ray head with a Jobs API).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from service.files import check_file_content
from service.files import FileRejected
from service.jobs import model_owner, output_name
from service.spec import parse_service_spec
from serve.spec import ServeSpecError
from storage.registry import base_config_digest_of_dir
from tests.support.jobs import fresh_bucket, registry_with_base
from trainers.tiny import build_random_lora_dir

TOKENS = {"acme": "token-of-acme", "globex": "token-of-globex"}
MAX_FILE = 8 * 1024


def _rows(n: int) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                   for i in range(n)).encode()


# =============================================================================
# Without Serve: upload checks, names, the spec.
# =============================================================================


def test_a_bad_file_is_rejected_with_the_line_number_of_each_problem() -> None:
    good = json.dumps({"prompt": "a", "completion": "b"})
    text = "\n".join([good, "{not json", good, json.dumps({"prompt": "a"}), "[1, 2]", "", good]).encode()
    with pytest.raises(FileRejected) as info:
        check_file_content(text, "train.jsonl")
    message = str(info.value)
    assert "3 bad row(s)" in message
    assert "line 2: not valid JSON" in message and "line 4:" in message and "line 5: expected a JSON object, got list" in message
    assert check_file_content(_rows(3), "ok.jsonl") == ("messages", 3, _rows(3))
    with pytest.raises(FileRejected, match="line 1: not UTF-8"):
        check_file_content(b"\xff\xfe{}", "bin.jsonl")
    many = b"\n".join([b"{bad"] * 14)
    with pytest.raises(FileRejected, match=r"14 bad row\(s\).*\(and 4 more\)"):
        check_file_content(many, "many.jsonl")


def test_preference_files_for_dpo_are_checked_and_openai_rows_stored_as_rayft_pairs() -> None:
    openai_row = {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
                  "preferred_output": [{"role": "assistant", "content": "4"}],
                  "non_preferred_output": [{"role": "assistant", "content": "5"}]}
    rayft_row = {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}
    fmt, rows, stored = check_file_content(_jsonl([openai_row, rayft_row]), "pairs.jsonl")
    assert (fmt, rows) == ("preference", 2)
    assert [json.loads(line) for line in stored.decode().splitlines()] == [
        {"prompt": openai_row["input"]["messages"], "chosen": openai_row["preferred_output"],
         "rejected": openai_row["non_preferred_output"]}, rayft_row]
    bad = _jsonl([rayft_row, {"prompt": "x", "chosen": "y"}, {"input": "hi", "preferred_output": [], "non_preferred_output": []},
                  {**openai_row, "tools": []}])
    with pytest.raises(FileRejected) as info:
        check_file_content(bad, "pairs.jsonl")
    message = str(info.value)
    assert "3 bad row(s)" in message and 'line 2: missing field "rejected"' in message
    assert 'line 3: "input" must be {"messages"' in message and "line 4: unexpected field(s) tools" in message


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_a_busy_cluster_keeps_a_job_queued_and_a_bad_submission_fails_it() -> None:
    from cluster.client.auth import ClusterUnreachable
    from service.jobs import _cluster_busy

    # A fresh local Ray's dashboard answers this until its job agent is up (seen with `rayft serve examples/serve.yaml`).
    assert _cluster_busy(RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later.."))
    assert _cluster_busy(ClusterUnreachable("cannot reach a Ray Jobs API at http://127.0.0.1:9"))
    assert not _cluster_busy(RuntimeError("Request failed with status code 400: bad runtime_env"))
    assert not _cluster_busy(ValueError("no such working dir"))


def test_fine_tuned_model_names_carry_the_tenant_and_fit_the_registry() -> None:
    name = output_name("acme", "my-suffix", "tiny", "ftjob-0123456789abcdef01234567")
    assert name == "ft.acme.my-suffix.cdef01234567" and model_owner(name) == "acme"
    long = output_name("a" * 24, "s" * 64, "tiny", "ftjob-0123456789abcdef01234567")
    assert len(long) + len("-s99999999") <= 64 and model_owner(long) == "a" * 24
    assert model_owner("reverse-lora") is None and model_owner("ft.x") == ""


def test_the_service_spec_lists_every_problem() -> None:
    with pytest.raises(ServeSpecError) as info:
        parse_service_spec({
            "base": {"name": "tiny", "source": "registry:tiny"},
            "api": {"auth": {"tenants": [{"name": "Bad Name", "token_sha256": ["0" * 64]}]}},
            "fine_tuning": {"max_concurrent_jobs": 0, "maxfile": 1},
        })
    text = str(info.value)
    assert "api.auth.tenants[0].name" in text and "fine_tuning.max_concurrent_jobs" in text and "fine_tuning.maxfile" in text
    assert not parse_service_spec({"base": {"name": "tiny", "source": "registry:tiny"}}).api_enabled()


# =============================================================================
# On Serve: one application for the module.
# =============================================================================


@dataclass
class App:
    url: str
    name: str

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKENS[tenant], max_retries=0)


@pytest.fixture(scope="module")
def app(serve_http, s3_server, tiny_model_dir: Path, tmp_path_factory) -> App:
    from ray import serve

    from service.app import build_app

    storage = fresh_bucket(s3_server, "rayft-svc")
    registry = registry_with_base(storage, tiny_model_dir)
    digest = base_config_digest_of_dir(tiny_model_dir)
    work = tmp_path_factory.mktemp("svc-adapters")
    # A fine-tuned model of acme (by its name), and a shared adapter published from the CLI.
    for name, seed in (("ft.acme.demo.000000000001", 1), ("shared-lora", 2)):
        registry.publish(name, build_random_lora_dir(tiny_model_dir, work / name, seed=seed), kind="adapter", base_model="tiny",
                         base_config_digest=digest, method="lora", params={}, metrics={}, lineage={})
    spec = parse_service_spec({
        "storage": storage,
        "base": {"name": "tiny", "source": "registry:tiny", "deployment": {"cpus": 0.5}},
        "api": {"auth": {"tenants": [{"name": t, "token_sha256": [hashlib.sha256(v.encode()).hexdigest()]} for t, v in TOKENS.items()]},
                "deployment": {"cpus": 0.1}},
        "fine_tuning": {"max_file_bytes": MAX_FILE},
    }, "test spec")
    name = f"svcfiles{uuid.uuid4().hex[:8]}"
    serve.run(build_app(spec), name=name, route_prefix=f"/{name}")
    yield App(url=f"{serve_http}/{name}", name=name)
    serve.delete(name)


@pytest.mark.slow
def test_files_upload_list_get_content_delete_with_the_openai_client(app: App) -> None:
    acme = app.client("acme")
    uploaded = acme.files.create(file=("train.jsonl", _rows(5)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(_rows(5)) and uploaded.status == "processed"
    assert uploaded.filename == "train.jsonl" and uploaded.purpose == "fine-tune"
    second = acme.files.create(file=("more.jsonl", _rows(2)), purpose="fine-tune")
    listed = [f.id for f in acme.files.list()]
    assert listed[:2] == [second.id, uploaded.id]
    assert acme.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert acme.files.content(uploaded.id).read() == _rows(5)
    assert acme.files.delete(second.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(second.id)
    assert second.id not in [f.id for f in acme.files.list()]


@pytest.mark.slow
def test_bad_uploads_are_refused_before_anything_is_stored(app: App) -> None:
    acme = app.client("acme")
    before = len(list(acme.files.list()))
    bad = b'{"prompt": "a", "completion": "b"}\n{oops\n{"prompt": "a", "completion": "b"}\n{"text": 3}\n'
    with pytest.raises(openai.BadRequestError) as info:
        acme.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 2: not valid JSON" in info.value.message and "line 4:" in info.value.message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        acme.files.create(file=("t.jsonl", _rows(1)), purpose="assistants")
    with pytest.raises(openai.APIStatusError) as too_big:
        acme.files.create(file=("big.jsonl", _rows(400)), purpose="fine-tune")
    assert too_big.value.status_code == 413
    not_multipart = httpx.post(f"{app.url}/v1/files", content=b"{}", headers={"Authorization": f"Bearer {TOKENS['acme']}",
                                                                              "Content-Type": "application/json"})
    assert not_multipart.status_code == 400 and "multipart" in not_multipart.json()["error"]["message"]
    assert len(list(acme.files.list())) == before


@pytest.mark.slow
def test_tenants_see_only_their_own_files_and_models_and_hostile_ids_are_404(app: App) -> None:
    acme, globex = app.client("acme"), app.client("globex")
    mine = acme.files.create(file=("a.jsonl", _rows(2)), purpose="fine-tune")
    assert mine.id not in [f.id for f in globex.files.list()]
    for call in (lambda: globex.files.retrieve(mine.id), lambda: globex.files.delete(mine.id), lambda: globex.files.content(mine.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert acme.files.retrieve(mine.id).id == mine.id  # still there
    for hostile in ("..%2F..%2Fregistry", "file-../../x", "file-" + "0" * 23 + "G", "%00"):
        response = httpx.get(f"{app.url}/v1/files/{hostile}", headers={"Authorization": f"Bearer {TOKENS['acme']}"})
        assert response.status_code == 404, hostile
    # Models: acme's fine-tuned adapter is invisible to globex (404 like a missing one); shared ones are shared.
    assert "ft.acme.demo.000000000001" in [m.id for m in acme.models.list()]
    assert "ft.acme.demo.000000000001" not in [m.id for m in globex.models.list()]
    assert {"tiny", "shared-lora"} <= {m.id for m in globex.models.list()}
    answer = acme.completions.create(model="ft.acme.demo.000000000001", prompt="hello", max_tokens=3, temperature=0)
    assert answer.choices[0].text is not None
    with pytest.raises(openai.NotFoundError) as hidden:
        globex.completions.create(model="ft.acme.demo.000000000001", prompt="hello", max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError) as missing:
        globex.completions.create(model="ft.acme.demo.000000000009", prompt="hello", max_tokens=3, temperature=0)
    assert hidden.value.message.replace("0001", "0009") == missing.value.message
    assert globex.completions.create(model="shared-lora", prompt="hello", max_tokens=3, temperature=0).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app.url}/v1", api_key="wrong", max_retries=0).files.list()
    # The web console shows every run and model in storage: a tenant's token is refused there.
    console = httpx.get(f"{app.url}/console/api/registry", headers={"Authorization": f"Bearer {TOKENS['acme']}"})
    assert console.status_code == 403 and "api.auth tokens only" in console.json()["error"]["message"]


@pytest.mark.slow
def test_rayft_ft_uploads_and_lists_files_through_the_api(app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from cluster.cli import main

    monkeypatch.setenv("RAYFT_API_TOKEN", TOKENS["globex"])
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_bytes(_rows(3))
    bad.write_bytes(b'{"text": "fine"}\n{"text": ""}\n')
    assert main(["ft", "upload", str(good), "--base-url", f"{app.url}/v1"]) == 0
    file_id = capsys.readouterr().out.strip()
    assert file_id.startswith("file-")
    assert main(["ft", "files", "--base-url", f"{app.url}/v1"]) == 0
    assert file_id in capsys.readouterr().out
    assert main(["ft", "upload", str(bad), "--base-url", f"{app.url}/v1"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "line 2:" in err


def test_a_job_request_becomes_a_job_spec_and_every_problem_is_listed_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """JobService without Serve or Ray: validation, the job spec it writes, and a cluster that cannot be reached."""
    from serve.protocol import ApiError
    from service.files import FileStore
    from service.jobs import JobService
    from service.spec import FineTuningApiSpec
    from storage.store import open_store

    storage = str(tmp_path / "store")
    registry = registry_with_base(storage, tiny_model_dir)
    files = FileStore(open_store(storage))
    spec = parse_service_spec({"storage": storage, "base": {"name": "tiny", "source": "registry:tiny"}})
    ft = FineTuningApiSpec(jobs_address="http://127.0.0.1:9", defaults={"batch_size": 4, "n_epochs": 2})
    jobs = JobService(ft, spec.serve_spec(), registry, files)
    train = files.add("acme", "t.jsonl", _rows(20))

    with pytest.raises(ApiError) as info:
        jobs.create("acme", {"model": "tiny@7", "training_file": train.id, "suffix": "x y", "seed": -1,
                             "hyperparameters": {"learning_rate_multiplier": 0}, "rayft": {"method": {"name": "lora", "r": 0}},
                             "integrations": [{"type": "wandb"}]})
    message = info.value.message
    assert info.value.http_status == 400 and message.startswith("6 problem(s)"), message
    for part in ("model:", "suffix: got 'x y'", "seed:", "hyperparameters.learning_rate_multiplier", "integrations:",
                 "rayft.method.lora.r: got 0"):
        assert part in message, part
    with pytest.raises(ApiError, match=r"rayft.method.lora.r: got 0"):
        jobs.create("acme", {"model": "tiny", "training_file": train.id, "rayft": {"method": {"name": "lora", "r": 0}}})
    with pytest.raises(ApiError, match="training_file: no file"):
        jobs.create("globex", {"model": "tiny", "training_file": train.id})  # acme's file, asked for by globex
    assert jobs.list("acme", None, 20)["data"] == []  # nothing was recorded

    job = jobs.create("acme", {"model": "tiny", "training_file": train.id, "suffix": "demo", "seed": 3})
    # 20 rows, 2 held out (eval_fraction 0.1), batch 4, 2 epochs: 2 * ceil(18 / 4) = 10 steps.
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert job["rayft"]["max_steps"] == 10 and job["rayft"]["fine_tuned_model_planned"].startswith("ft.acme.demo.")
    # The cluster's Jobs API is unreachable: the job stays queued (never dropped) and says why.
    assert job["status"] == "queued" and job["error"] is None
    events = jobs.events("acme", job["id"], None, 20)["data"]
    assert events[0]["level"] == "warn" and "cannot reach a Ray Jobs API at http://127.0.0.1:9" in events[0]["message"]
    jobs.tick()
    assert len(jobs.events("acme", job["id"], None, 20)["data"]) == len(events)  # the same cause is not repeated
    record = jobs._load("acme", job["id"])
    assert record.job_spec["data"]["train"] == str(tmp_path / "store" / "service" / "files" / "acme" / f"{train.id}.jsonl")
    assert record.job_spec["training"]["seed"] == 3 and record.job_spec["storage"] == {"uri": storage}
    assert [j["id"] for j in jobs.list("acme", None, 20)["data"]] == [job["id"]] and jobs.list("globex", None, 20)["data"] == []

    # method dpo = rayft's `objective: dpo` on a file of preference pairs (beta from the method's hyperparameters).
    pairs = files.add("acme", "p.jsonl", _jsonl([{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(8)]))
    with pytest.raises(ApiError) as info:
        jobs.create("acme", {"model": "tiny", "training_file": train.id, "validation_file": pairs.id,
                             "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}})
    message = info.value.message
    assert message.startswith("2 problem(s)"), message
    assert "training_file: " in message and "method dpo needs preference pairs" in message
    assert "validation_file" not in message  # a file of pairs is what dpo trains on
    assert "method.dpo.hyperparameters.beta" in message
    with pytest.raises(ApiError, match="holds preference pairs, which method supervised cannot train on"):
        jobs.create("acme", {"model": "tiny", "training_file": pairs.id})
    dpo = jobs.create("acme", {"model": "tiny", "training_file": pairs.id,
                               "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}}})
    assert dpo["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4,
                                                                         "learning_rate_multiplier": 1.0, "beta": 0.25}}}
    assert jobs._load("acme", dpo["id"]).job_spec["objective"] == {"name": "dpo", "beta": 0.25}
