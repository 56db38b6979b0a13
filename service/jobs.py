"""Fine-tuning jobs in OpenAI's shape, each one a real Ray job running `rayft train`.

A request is checked once (every problem in one 400), turned into a rayft job spec
(trainers/spec.py), and recorded in storage (`service/jobs/<tenant>/<job-id>.json`). When
fewer than `max_concurrent_jobs` run, it is submitted through the Ray Jobs API with rayft's
own submission code (cluster/client/submission.py): the spec travels as the job's working dir and the
driver runs `rayft train job.yaml --run-id <job-id>` — planning, data, Ray Train with
checkpoints and restarts, publishing to the registry — exactly as on the command line.

Nothing lives only in a replica: the record holds what was asked and what became of it;
the live state comes from the Ray job (status, log) and the run's checkpoints in storage.
Any replica (or a new one after a restart) answers every job the same way.

States: `queued` (waiting for a slot, or the Ray job is PENDING), `validating_files` (the
driver is checking spec, data and plan), `running` (Ray Train is fitting), `succeeded` (the
adapter is published: `fine_tuned_model` answers on /v1/chat/completions), `failed` (with
the driver's own error line), `cancelled` (stopped; nothing published).

Fine-tuned models are named `ft.<tenant>.<suffix or base>.<12 hex of the job id>`: the
tenant in the name is what lets the inference routes show a tenant only its own models.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from cluster.client.auth import find_auth_token
from cluster.client.follow import last_error_line
from cluster.client.jobs_client import JobNotFound as RayJobNotFound
from cluster.client.jobs_client import JobsClient, jobs_api_address
from cluster.client.submission import SubmitOptions, prepare_submission, submit_job

from serve.protocol import ApiError
from serve.spec import ServeSpec
from service.files import FILE_ID, PREFERENCE, FileNotFound, FileStore, new_id, page
from service.spec import FineTuningApiSpec
from storage.configs import validation_problems
from storage.errors import InvalidName, NotFound, RayftError
from storage.models import REGISTRY_PREFIX
from storage.registry import Registry
from storage.safety import parse_ref
from storage.store import default_storage_uri
from trainers.checkpoints import ADAPTER_DIR, STATE_NAME, stored_checkpoints
from trainers.methods import MethodConfig
from trainers.spec import SpecError, parse_job_spec
from trainers.state_io import state_without_tensors

logger = logging.getLogger("ray.serve")

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_PREFIX = "service/jobs"
FT_PREFIX = "ft."
TERMINAL = ("succeeded", "failed", "cancelled")
_STEP_LINE = re.compile(
    r"\[rayft\] step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>[-\d.naif]+) lr (?P<lr>[-+\d.e]+) "
    r"tok/s (?P<tps>[\d,]+) eta (?P<m>\d+):(?P<s>\d+)"
)


class JobNotFound(NotFound):
    """No such fine-tuning job for this tenant (a malformed id, another tenant's, or a missing one: the same answer)."""


def model_owner(name: str) -> str | None:
    """The tenant a fine-tuned model belongs to (`ft.<tenant>....`), or None for a shared model."""
    if not name.startswith(FT_PREFIX):
        return None
    return name.split(".")[1] if name.count(".") >= 3 else ""


# --------------------------------------------------------------------------- the request


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


Auto = Literal["auto"]


def _number_or_auto(kind: type, low: float, high: float, low_open: bool = False):
    """A validator: "auto", or a `kind` number in [low, high] (low excluded if `low_open`); one clear message."""
    def check(value: Any) -> Any:
        if value == "auto":
            return value
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
        if ok_type and (value > low if low_open else value >= low) and value <= high:
            return kind(value)
        bound = f"{'>' if low_open else '≥'} {low:g} and ≤ {high:g}"
        raise ValueError(f"must be \"auto\" or {'an integer' if kind is int else 'a number'} {bound}")
    return check


class Hyperparameters(_Request):
    n_epochs: Any = Field("auto", description="Passes over the training file (auto: fine_tuning.defaults.n_epochs).")
    batch_size: Any = Field("auto", description="Examples per optimizer step, over all workers (auto: defaults.batch_size).")
    learning_rate_multiplier: Any = Field("auto", description="Times fine_tuning.defaults.learning_rate (auto: 1).")
    beta: Any = Field(None, description="DPO only: how far the model may move from the base (smaller = further); auto: 0.1.")

    _n_epochs = field_validator("n_epochs")(_number_or_auto(int, 1, 100))
    _batch_size = field_validator("batch_size")(_number_or_auto(int, 1, 4096))
    _lr = field_validator("learning_rate_multiplier")(_number_or_auto(float, 0, 100, low_open=True))
    _beta = field_validator("beta")(_number_or_auto(float, 0, 100, low_open=True))


class _MethodParams(_Request):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class MethodRequest(_Request):
    type: Literal["supervised", "dpo"] = Field(
        description="supervised (SFT on messages / prompt-completion / text rows) or dpo (rayft's `objective: dpo` on "
        "preference pairs; hyperparameters.beta is its beta)."
    )
    supervised: _MethodParams | None = None
    dpo: _MethodParams | None = None


class RayftExtension(_Request):
    """rayft's own settings of a job: the `rayft` field of the request (`extra_body={"rayft": {...}}` in the openai client)."""

    method: dict[str, Any] | None = Field(
        None, description="The job spec's method section, e.g. {name: lora, r: 16, alpha: 32, target_modules: all-linear} "
        "(any PEFT method of trainers/methods, or full); default: fine_tuning.defaults.method."
    )
    workers: int | None = Field(None, ge=1, le=4096, description="Ray Train workers (one per GPU).")
    gpus: bool | Literal["auto"] | None = Field(None, description="Train on GPUs (auto: if the cluster has them).")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per worker.")
    max_seq_len: int | None = Field(None, ge=8, le=131072, description="Tokens per example.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps, instead of the epochs' count.")
    checkpoints: int | None = Field(None, ge=1, le=100, description="Checkpoints written (evenly spaced), each listed and servable.")


class CreateJob(_Request):
    model: str = Field(description="Base model: the served base's name, or a registry model NAME[@VERSION].")
    training_file: str = Field(description="A file id from POST /v1/files.")
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: MethodRequest | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    rayft: RayftExtension | None = None


class JobRecord(BaseModel):
    """What is stored for a job: the request as resolved, and what became of it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    created_at: int
    state: Literal["queued", "submitted", "succeeded", "failed", "cancelled"] = "queued"
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    metadata: dict[str, str] | None = None
    output_name: str
    job_spec: dict[str, Any]
    submitted_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    cancel_requested: bool = False
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    events: list[dict[str, Any]] = Field(default_factory=list)
    log_seen: int = 0
    checkpoint_models: dict[str, str] = Field(default_factory=dict)


def _problems_error(problems: list[str]) -> ApiError:
    param = problems[0].split(":", 1)[0].split(".")[0].split("[")[0] if problems else None
    return ApiError(
        400, f"{len(problems)} problem(s) with this fine-tuning job: " + "; ".join(problems),
        param=param, code="invalid_fine_tuning_job",
    )


def _method_problems(ext: Any) -> list[str]:
    """Problems of `rayft.method` on its own (a request with other problems never reaches the job-spec check)."""
    method = ext.get("method") if isinstance(ext, dict) else None
    if not isinstance(method, dict):
        return []
    try:
        TypeAdapter(MethodConfig).validate_python(method)
    except ValidationError as exc:
        return [f"rayft.method.{p}" for p in validation_problems(exc.errors(), "see trainers/methods")]
    return []


#: DPO's beta when the request leaves it out or says "auto" (OpenAI's and TRL's default).
_DPO_BETA = 0.1


def _file_fits_method(field: str, obj: Any, kind: str) -> list[str]:
    """A DPO job trains on preference pairs, a supervised one on the other formats."""
    if kind == "dpo" and obj.format != PREFERENCE:
        return [f"{field}: {obj.id} holds {obj.format} rows; method dpo needs preference pairs "
                '({"prompt", "chosen", "rejected"} or OpenAI\'s {"input", "preferred_output", "non_preferred_output"})']
    if kind == "supervised" and obj.format == PREFERENCE:
        return [f"{field}: {obj.id} holds preference pairs, which method supervised cannot train on; "
                'use method {"type": "dpo"}, or upload messages / prompt-completion rows']
    return []


def _cluster_busy(err: Exception) -> bool:
    """Whether a submission failed for the cluster's sake, to be retried at the next tick: its Jobs API is
    unreachable or refuses the token (503/401), or answers 5xx, e.g. "No available agent to submit job,
    please try again later" from a dashboard whose job agent is still starting."""
    if isinstance(err, RayftError):
        return getattr(err, "http_status", 400) in (401, 503)
    return isinstance(err, RuntimeError) and bool(re.search(r"status code 5\d\d|try again later", str(err)))


def _suffix_problem(suffix: str | None) -> str | None:
    if suffix is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", suffix):
        return f"suffix: got {suffix!r}, must be lowercase letters, digits and '-' (at most 64), starting with a letter or digit"
    return None


def output_name(tenant: str, suffix: str | None, base: str, job_id: str) -> str:
    """`ft.<tenant>.<suffix or base>.<12 hex>`, within the registry's 64 characters (the middle part is cut)."""
    tail = job_id[-12:]
    middle = re.sub(r"[^a-z0-9-]+", "-", (suffix or base).lower()).strip("-") or "model"
    room = 64 - len(f"{FT_PREFIX}{tenant}..{tail}") - len("-s99999999")  # room for checkpoint names
    return f"{FT_PREFIX}{tenant}.{middle[: max(room, 1)]}.{tail}"


# --------------------------------------------------------------------------- the service


class JobService:
    """Create, follow and cancel jobs; records in storage, work on the cluster's Ray Jobs API."""

    def __init__(self, ft: FineTuningApiSpec, spec: ServeSpec, registry: Registry, files: FileStore):
        self.ft = ft
        self.spec = spec
        self.registry = registry
        self.store = registry.store
        self.files = files
        self.storage_uri = spec.storage or default_storage_uri()
        self._client = None
        self._lock = threading.Lock()

    # -- records

    @staticmethod
    def _key(tenant: str, job_id: str) -> str:
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise JobNotFound(f"no fine-tuning job {str(job_id)[:40]!r}")
        return f"{_PREFIX}/{tenant}/{job_id}.json"

    def _load(self, tenant: str, job_id: str) -> JobRecord:
        key = self._key(tenant, job_id)
        try:
            return JobRecord.model_validate_json(self.store.get_bytes(key))
        except NotFound:
            raise JobNotFound(f"no fine-tuning job {job_id!r}") from None

    def _save(self, record: JobRecord) -> None:
        self.store.put_bytes(record.model_dump_json().encode(), self._key(record.tenant, record.id))

    def _all(self, tenant: str | None = None) -> list[JobRecord]:
        """Every job record (of one tenant, or of all), oldest first."""
        records = []
        for key in self.store.list(f"{_PREFIX}/{tenant}/" if tenant else f"{_PREFIX}/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3].endswith(".json"):
                try:
                    records.append(self._load(parts[2], parts[3][: -len(".json")]))
                except (NotFound, ValueError):
                    continue
        return sorted(records, key=lambda r: r.id)

    @staticmethod
    def _event(record: JobRecord, message: str, level: str = "info", kind: str = "message", data: Any = None, at: int | None = None) -> None:
        record.events.append({
            "id": f"ftevent-{record.id[-12:]}{len(record.events):012x}", "object": "fine_tuning.job.event",
            "created_at": at or int(time.time()), "level": level, "message": message, "type": kind, "data": data,
        })

    # -- the cluster

    def client(self):
        """The Ray Jobs API client (made once per replica): fine_tuning.jobs_address, else this cluster's dashboard."""
        if self._client is None:
            address = self.ft.jobs_address
            if address is None:
                from ray._private.services import get_webui_url_from_internal_kv

                address = get_webui_url_from_internal_kv()  # the head's dashboard, as the cluster registered it
                if not address:
                    raise ApiError(503, "this Ray cluster runs no dashboard, so it has no Jobs API: start Ray with the "
                                   "dashboard or set fine_tuning.jobs_address", code="jobs_api_unavailable")
            self._client = JobsClient(jobs_api_address(address), find_auth_token())
        return self._client

    def _submit(self, record: JobRecord) -> None:
        """Submit the record's job spec as a Ray job `rayft train job.yaml --run-id <id>` (submission id = job id)."""
        with tempfile.TemporaryDirectory(prefix="rayft-ftjob-") as tmp:
            Path(tmp, "job.yaml").write_text(yaml.safe_dump(record.job_spec, sort_keys=False))
            options = SubmitOptions(
                command="train", job="job.yaml", args=["--run-id", record.id], working_dir=tmp,
                # RAYFT_RUN_SOURCE: the run's record says the fine-tuning API started it (the console's Runs page)
                env=[f"{k}={v}" for k, v in {"RAYFT_RUN_SOURCE": "api", **self.ft.job_env}.items()],
                aws_credentials=self.ft.forward_aws_credentials,
            )
            job = prepare_submission(options, cwd=Path(tmp))
            # Submission id = job id: a second replica submitting the same job at the same tick is refused.
            # (The entrypoint runs on the cluster's own Python, whatever its PATH holds: cluster/client/submission.py.)
            job = job.model_copy(update={"submission_id": record.id})
            try:
                submit_job(self.client(), job)
            except RuntimeError as err:
                if "already exists" not in str(err):  # another replica submitted it first
                    raise

    # -- create

    def create(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        """Check the request (every problem at once), record the job, and start it if a slot is free."""
        problems: list[str] = []
        try:
            req = CreateJob.model_validate(body)
        except ValidationError as exc:
            req = None
            problems += validation_problems(exc.errors(), "see the OpenAI fine-tuning API; rayft's own settings go under `rayft`")
        raw = body
        file_objs = {}
        for field in ("training_file", "validation_file"):
            value = raw.get(field)
            if value is None or not isinstance(value, str):
                continue
            if not FILE_ID.fullmatch(value):
                problems.append(f"{field}: got {value[:40]!r}, not a file id (file-...); upload with POST /v1/files")
                continue
            try:
                file_objs[field] = self.files.get(tenant, value)
            except FileNotFound:
                problems.append(f"{field}: no file {value!r}; GET /v1/files lists yours")
        method = raw.get("method")
        kind = method.get("type", "supervised") if isinstance(method, dict) else "supervised"
        for field, obj in file_objs.items():
            problems += _file_fits_method(field, obj, kind)
        source = self._base_source(raw.get("model"), problems)
        problem = _suffix_problem(raw.get("suffix") if isinstance(raw.get("suffix"), str) else None)
        if problem:
            problems.append(problem)
        if raw.get("integrations"):
            problems.append("integrations: not supported by rayft; remove it (follow jobs with /events and /checkpoints)")
        if req is None or problems:
            problems += _method_problems(raw.get("rayft"))  # otherwise checked with the whole job spec below
            raise _problems_error(problems)
        record = self._new_record(tenant, req, source, file_objs, problems)
        if problems:
            raise _problems_error(problems)
        self._event(record, f"Created fine-tuning job {record.id} of {record.model}")
        self._save(record)
        self.tick()
        return self.view(self._load(tenant, record.id))

    def _base_source(self, model: Any, problems: list[str]) -> str | None:
        """The job spec's model.source for `model`: the served base, or a published registry model."""
        if not isinstance(model, str):
            return None
        if model == self.spec.base.name:
            return self.spec.base.source
        try:
            parse_ref(model)
            manifest = self.registry.resolve(model)
        except InvalidName as err:
            problems.append(f"model: {err}")
            return None
        except NotFound:
            problems.append(f"model: got {model!r}, not a base model here; use {self.spec.base.name!r} (the served base) "
                            "or a model published in the registry")
            return None
        if manifest.kind != "model":
            problems.append(f"model: {model!r} is an adapter; fine-tune a base model such as {self.spec.base.name!r}")
            return None
        return f"{REGISTRY_PREFIX}{manifest.ref}"

    def _new_record(self, tenant: str, req: CreateJob, source: str, file_objs: dict, problems: list[str]) -> JobRecord:
        d = self.ft.defaults
        ext = req.rayft or RayftExtension()
        kind = req.method.type if req.method else "supervised"
        given = getattr(req.method, kind, None) if req.method else None
        hp = req.hyperparameters or (given.hyperparameters if given else Hyperparameters())
        if kind == "supervised" and hp.beta is not None:
            problems.append("hyperparameters.beta: DPO only; drop it, or use method {\"type\": \"dpo\"}")
        job_id = new_id("ftjob")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        workers = ext.workers or d.num_workers
        rows = file_objs["training_file"].rows
        eval_fraction = 0.0 if req.validation_file else d.eval_fraction
        train_rows = max(1, rows - (max(1, round(rows * eval_fraction)) if eval_fraction else 0))
        batch = min(d.batch_size, train_rows) if hp.batch_size == "auto" else hp.batch_size
        batch = max(batch, workers) if hp.batch_size == "auto" else batch
        if batch % workers:
            problems.append(f"hyperparameters.batch_size: got {batch}, must be a multiple of rayft.workers ({workers})")
        epochs = d.n_epochs if hp.n_epochs == "auto" else hp.n_epochs
        multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
        steps = ext.max_steps or epochs * math.ceil(train_rows / batch)
        if steps > d.max_steps_limit:
            problems.append(f"hyperparameters.n_epochs: {epochs} epochs of {train_rows} rows at batch size {batch} are "
                            f"{steps} steps; this server allows at most {d.max_steps_limit}")
        every = max(1, math.ceil(steps / (ext.checkpoints or d.checkpoints)))
        name = output_name(tenant, req.suffix, req.model.split("@")[0], job_id)
        data: dict[str, Any] = {"train": self.files.data_uri(tenant, req.training_file), "max_seq_len": ext.max_seq_len or d.max_seq_len}
        if req.validation_file:
            data["eval"] = self.files.data_uri(tenant, req.validation_file)
        else:
            data["eval_fraction"] = eval_fraction
        resources: dict[str, Any] = {"num_workers": workers, "use_gpu": ext.gpus if ext.gpus is not None else d.use_gpu,
                                     "max_failures": d.max_failures}
        if (ext.cpus_per_worker or d.cpus_per_worker) is not None:
            resources["cpus_per_worker"] = ext.cpus_per_worker or d.cpus_per_worker
        job_spec = {
            "model": {"source": source},
            "data": data,
            "method": ext.method or d.method,
            **({"objective": {"name": "dpo", "beta": _DPO_BETA if hp.beta in (None, "auto") else hp.beta}} if kind == "dpo" else {}),
            "training": {"max_steps": steps, "micro_batch_size": max(1, batch // workers), "lr": d.learning_rate * multiplier,
                         "seed": seed, "eval_every": every, "checkpoint_every": every, "keep_checkpoints": ext.checkpoints or d.checkpoints,
                         "log_every": max(1, min(every, steps // 10 or 1))},
            "resources": resources,
            "output": {"name": name},
            "storage": {"uri": self.storage_uri},
        }
        try:
            parse_job_spec(job_spec, "job")  # the raw mapping is what travels: `rayft train` sees only what was set
        except SpecError as err:
            problems += [f"rayft.{p}" if p.startswith(("method", "resources")) else f"job spec {p}" for p in err.problems]
        return JobRecord(
            id=job_id, tenant=tenant, created_at=int(time.time()), model=req.model, training_file=req.training_file,
            validation_file=req.validation_file, suffix=req.suffix, seed=seed,
            hyperparameters={"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier,
                             **({"beta": job_spec["objective"]["beta"]} if kind == "dpo" else {})},
            method={"type": kind}, metadata=req.metadata, output_name=name, job_spec=job_spec,
        )

    # -- follow

    def tick(self) -> None:
        """Refresh every unfinished job and start queued ones while slots are free (oldest first)."""
        with self._lock:
            records = []
            for record in self._all():
                if record.state in ("queued", "submitted"):
                    try:
                        record = self._refresh(record)
                    except RayftError as err:
                        self._client = None
                        logger.warning("cannot refresh fine-tuning job %s: %s", record.id, err)
                    records.append(record)
            active = sum(1 for r in records if r.state == "submitted")
            for record in records:
                if record.state != "queued" or active >= self.ft.max_concurrent_jobs:
                    continue
                try:
                    self._submit(record)
                except Exception as err:  # noqa: BLE001 - whatever stops a submission is the job's error, not a 500
                    if _cluster_busy(err):  # the cluster cannot take it now: the job waits, never fails for it
                        self._client = None
                        self._note_waiting(record, err)
                        break
                    message = str(err) if isinstance(err, RayftError) else f"{type(err).__name__}: {err}"
                    self._finish(record, "failed", error={"code": "submission_failed", "message": message, "param": None})
                    continue
                record.state, record.submitted_at = "submitted", int(time.time())
                self._event(record, f"Started Ray job {record.id} (rayft train)")
                self._save(record)
                active += 1

    def _note_waiting(self, record: JobRecord, err: Exception) -> None:
        """A queued job that cannot be submitted now stays queued; the cause is one warning event (not one per tick)."""
        message = f"Waiting to start: {err}"
        if not record.events or record.events[-1]["message"] != message:
            self._event(record, message, level="warn")
            self._save(record)

    def _refreshed(self, tenant: str, job_id: str) -> JobRecord:
        """The record, brought up to date with its Ray job when the cluster answers (else as stored)."""
        record = self._load(tenant, job_id)
        if record.state != "submitted":
            return record
        with self._lock:
            try:
                return self._refresh(self._load(tenant, job_id))
            except RayftError:  # the Jobs API is away for a moment: the stored record still answers
                self._client = None
                return record

    def _refresh(self, record: JobRecord) -> JobRecord:
        """Bring a submitted job's record up to date with its Ray job; returns it (saved if it changed)."""
        if record.state != "submitted":
            return record
        client = self.client()
        try:
            info = client.info(record.id)
        except RayJobNotFound:
            self._finish(record, "failed", error={"code": "job_lost", "param": None,
                                                  "message": "the Ray job is gone from the cluster (was the cluster replaced?)"})
            return record
        status = str(info.status)
        changed = self._read_log(record, client.logs(record.id))
        if record.started_at is None and status != "PENDING":
            record.started_at, changed = int((info.start_time or time.time() * 1000) / 1000), True
        if status == "SUCCEEDED":
            self._succeeded(record)
        elif status == "FAILED":
            line = last_error_line(client.logs(record.id)) or (info.message or "the Ray job failed").strip().splitlines()[0]
            self._finish(record, "cancelled" if record.cancel_requested else "failed",
                         error=None if record.cancel_requested else {"code": "training_failed", "message": line, "param": None})
        elif status == "STOPPED":
            self._finish(record, "cancelled")
        elif changed:
            self._save(record)
        return record

    def _read_log(self, record: JobRecord, log: str) -> bool:
        """Turn new lines of the driver's log into events (progress as metrics); True if there were any."""
        lines = log.splitlines()
        new = lines[record.log_seen :]
        for line in new:
            text = line.strip()
            match = _STEP_LINE.search(text)
            if match:
                data = {"step": int(match["step"]), "total_steps": int(match["total"]), "train_loss": float(match["loss"]),
                        "learning_rate": float(match["lr"]), "tokens_per_s": int(match["tps"].replace(",", "")),
                        "eta_s": int(match["m"]) * 60 + int(match["s"])}
                self._event(record, text.split("[rayft] ", 1)[1], kind="metrics", data=data)
            elif "[rayft] " in text:
                self._event(record, text.split("[rayft] ", 1)[1])
            elif text.startswith("rayft train: error:"):
                self._event(record, text, level="error")
        record.log_seen = len(lines)
        return bool(new)

    def _succeeded(self, record: JobRecord) -> None:
        if record.cancel_requested:  # stopped too late: what it published must not stay
            self._unpublish(record)
            self._finish(record, "cancelled")
            return
        try:
            manifest = self.registry.resolve(record.output_name)
        except NotFound:
            self._finish(record, "failed", error={"code": "not_published", "param": None,
                                                  "message": f"the job ended without publishing {record.output_name}"})
            return
        record.fine_tuned_model = manifest.name
        tokens = manifest.metrics.get("trained_tokens")
        record.trained_tokens = int(tokens) if tokens is not None else None
        self._publish_checkpoints(record, manifest)
        self._finish(record, "succeeded")

    def _finish(self, record: JobRecord, state: str, error: dict[str, Any] | None = None) -> None:
        record.state, record.error, record.finished_at = state, error, int(time.time())
        message = {"succeeded": f"The job has successfully completed: {record.fine_tuned_model}",
                   "failed": f"The job failed: {(error or {}).get('message')}", "cancelled": "The job was cancelled; nothing was published"}[state]
        self._event(record, message, level="error" if state == "failed" else "info")
        self._save(record)

    def _unpublish(self, record: JobRecord) -> None:
        names = [record.output_name, *record.checkpoint_models.values()]
        for name in names:
            for version in self.registry.versions(name.split("@")[0]):
                self.registry.delete(f"{name.split('@')[0]}@{version}")

    def _publish_checkpoints(self, record: JobRecord, final) -> None:
        """Every kept checkpoint but the last as an adapter of its own (`<model>-s<step>`), so each is servable."""
        final_step = int(final.metrics.get("step", -1))
        for step, checkpoint in sorted(stored_checkpoints(self.storage_uri, record.id), key=lambda c: c[0]):
            if step == final_step or final.kind != "adapter":
                record.checkpoint_models[str(step)] = final.ref
                continue
            name = f"{record.output_name}-s{step}"
            if not self.registry.versions(name):
                with checkpoint.as_directory() as local:
                    self.registry.publish(
                        name, Path(local) / ADAPTER_DIR, kind="adapter", base_model=final.base_model,
                        base_config_digest=final.base_config_digest, method=final.method, params=final.params,
                        metrics={"step": step}, lineage={**final.lineage, "checkpoint_of": final.ref}, traits=final.traits,
                    )
            record.checkpoint_models[str(step)] = f"{name}@1"

    # -- answers

    def view(self, record: JobRecord) -> dict[str, Any]:
        """The job as OpenAI's FineTuningJob (with the live state of a submitted one)."""
        status, estimated = record.state, None
        if record.state == "submitted":
            started = any(e["message"].startswith("run ") for e in record.events)
            progress = [e for e in record.events if e["type"] == "metrics"]
            status = "queued" if record.started_at is None else "running" if started else "validating_files"
            if progress:
                estimated = progress[-1]["created_at"] + progress[-1]["data"]["eta_s"]
        hp, kind = record.hyperparameters, record.method.get("type", "supervised")
        return {
            "id": record.id, "object": "fine_tuning.job", "created_at": record.created_at, "error": record.error,
            "fine_tuned_model": record.fine_tuned_model if status == "succeeded" else None,
            "finished_at": record.finished_at, "hyperparameters": hp, "model": record.model,
            "organization_id": record.tenant, "result_files": [], "seed": record.seed, "status": status,
            "trained_tokens": record.trained_tokens, "training_file": record.training_file,
            "validation_file": record.validation_file, "estimated_finish": estimated, "integrations": None,
            "metadata": record.metadata, "user_provided_suffix": record.suffix,
            "method": {"type": kind, kind: {"hyperparameters": hp}},
            "rayft": {"ray_job_id": record.id if record.submitted_at else None, "run_id": record.id,
                      "fine_tuned_model_planned": record.output_name, "method": record.job_spec.get("method"),
                      "max_steps": record.job_spec.get("training", {}).get("max_steps")},
        }

    def retrieve(self, tenant: str, job_id: str) -> dict[str, Any]:
        return self.view(self._refreshed(tenant, job_id))

    def list(self, tenant: str, after: str | None, limit: int) -> dict[str, Any]:
        if after is not None:
            self._key(tenant, after)
        records = sorted(self._all(tenant), key=lambda r: r.id, reverse=True)
        return page([self.view(r) for r in records], after, limit)

    def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._load(tenant, job_id)
            if record.state in TERMINAL:
                raise ApiError(400, f"job {job_id} has already {record.state}; only queued or running jobs can be cancelled",
                               param="job_id", code="job_finished")
            if record.state == "queued":
                self._finish(record, "cancelled")
                return self.view(record)
            record.cancel_requested = True
            self._event(record, "Cancellation requested: stopping the Ray job")
            self._save(record)
            self.client().stop(record.id)
            return self.view(self._refresh(record))

    def events(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        return page(list(reversed(self._refreshed(tenant, job_id).events)), after, limit)

    def checkpoints(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        """The run's checkpoints in storage, newest first, with their metrics; each names a servable model once the job succeeded."""
        record = self._load(tenant, job_id)
        items = []
        for step, checkpoint in sorted(stored_checkpoints(self.storage_uri, record.id), key=lambda c: -c[0]):
            metrics = _checkpoint_metrics(checkpoint, STATE_NAME, step)
            items.append({
                "id": f"ftckpt-{record.id[-12:]}{step:012x}", "object": "fine_tuning.job.checkpoint",
                "created_at": record.finished_at or int(time.time()), "fine_tuning_job_id": record.id, "step_number": step,
                "fine_tuned_model_checkpoint": record.checkpoint_models.get(str(step)),
                "metrics": metrics,
            })
        return page(items, after, limit)


def _checkpoint_metrics(checkpoint, state_name: str, step: int) -> dict[str, Any]:
    """OpenAI's checkpoint metrics from the checkpoint's saved history (its last entry)."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{state_name}.json") as stream:
            history = state_without_tensors(stream.read()).get("history") or []
    except (OSError, ValueError):
        history = []
    last = history[-1] if history else {}
    return {"step": step, "train_loss": last.get("train_loss"), "valid_loss": last.get("eval_loss"),
            "full_valid_loss": last.get("eval_loss")}
