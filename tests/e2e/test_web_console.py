"""The web console (/console on the Serve app): its data checks without Ray, then the pages in a real headless
Chromium against a real Serve app, with real runs (one that trains and publishes, one that fails) in the embedded
S3 store, a merged adapter, and the app's own OpenAI endpoints.

Screenshots of every page go to `console-screenshots/` at the repository root (gitignored; `RAYFT_SCREENSHOTS`
moves it): look at them after a change to the page.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from service.console import ConsoleData, checked_ref, checked_run_id
from serve.protocol import ApiError
from storage.errors import InvalidName, NotFound
from storage.registry import open_registry
from storage.runs import RunProgress, RunRecord, now, read_record, run_ids, validate_run_id, write_progress, write_record
from tests.support.jobs import fresh_bucket, registry_with_base
from tests.support.webdriver import Browser, missing_browser

TOKEN = "console-test-token"
SCREENSHOTS = Path(os.environ.get("RAYFT_SCREENSHOTS", Path(__file__).resolve().parents[2] / "console-screenshots"))
PROMPT = "reverse apple ="
HOSTILE_RUN_IDS = ["..", "...", "a..b", "-rf", ".hidden", "x" * 201, "a b", "run\x00x", "run\\x", "ünicode", "$(id)"]


# --------------------------------------------------------------------------- without Ray: ids and storage records


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS)
def test_hostile_run_ids_are_refused_before_storage(run_id):
    with pytest.raises(InvalidName, match="invalid run id"):
        validate_run_id(run_id)
    with pytest.raises(ApiError) as err:
        checked_run_id(run_id)
    assert err.value.http_status == 400


@pytest.mark.parametrize("name, version", [("..", "1"), ("Tiny", "1"), ("a/b", "1"), ("tiny", "0"), ("tiny", "01"),
                                           ("tiny", "1e3"), ("tiny", "-1"), ("tiny", "9" * 12)])
def test_hostile_registry_refs_are_refused(name, version):
    with pytest.raises(ApiError) as err:
        checked_ref(name, version)
    assert err.value.http_status == 400


def test_runs_listing_and_records_on_a_local_store(local_uri):
    from storage.store import open_store

    store = open_store(local_uri)
    data = ConsoleData(open_registry(local_uri))
    assert data.runs()["runs"] == []  # empty store: an empty list, not an error
    with pytest.raises(NotFound, match="run 'nope' does not exist"):
        data.run("nope")
    record = RunRecord(run_id="a-1", state="failed", name="a", method="lora", base="tiny", max_steps=4, spec={},
                       started_at=now(), finished_at=now(), error="run a-1 failed: boom")
    write_record(store, record)
    write_progress(store, RunProgress(run_id="a-1", step=2, max_steps=4, history=[{"step": 2, "train_loss": 1.5, "eval_loss": None}],
                                      log_tail=["[rayft] step 2/4 loss 1.5000"], updated_at=now()))
    store.put_bytes(b"{}", "runs/a-1/step-00000002/trainer_state.json")
    store.put_bytes(b"x", "runs/not a run/file")  # not a run id: never listed
    assert run_ids(store) == {"a-1": ["rayft-progress.json", "rayft-run.json", "step-00000002/"]}
    assert read_record(store, "a-1") == record
    run = data.run("a-1")
    assert (run["state"], run["error"], run["step"], run["checkpoints"], run["train_loss"]) == ("failed", "run a-1 failed: boom", 2, [2], 1.5)
    assert run["log_tail"] == ["[rayft] step 2/4 loss 1.5000"]
    store.put_bytes(b"not json", "runs/a-1/rayft-run.json")  # a damaged record: shown as unknown, not a crash
    assert data.run("a-1")["state"] == "unknown"


# --------------------------------------------------------------------------- in the browser


@dataclass
class Console:
    url: str  # the app's root
    app: str
    storage: str
    run_id: str = ""
    failed_run_id: str = ""
    history: list = field(default_factory=list)
    shots: list = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def storage_requests(self) -> int:
        from ray import serve

        return serve.get_app_handle(self.app).stats.remote().result()["counts"].get("storage_requests", 0)


@pytest.fixture(scope="module")
def console(serve_http, s3_server, tiny_model_dir, reverse_data, tmp_path_factory):
    """One trained-and-published run, one failed run, a merged adapter, and the Serve app over that store."""
    from ray import serve

    from serve.spec import parse_serve_spec
    from service.app import build_app  # the console is the top floor's (service/)
    from storage.registry import base_config_digest_of_dir
    from tests.support.inprocess import fit_in_process
    from tests.support.jobs import make_job
    from trainers.merge import MergeOptions, merge_adapters
    from trainers.run import TrainingFailed, run_training
    from trainers.tiny import build_random_lora_dir

    storage = fresh_bucket(s3_server, "rayft-console")
    registry = registry_with_base(storage, tiny_model_dir)
    digest = base_config_digest_of_dir(tiny_model_dir)
    training = {"max_steps": 12, "eval_every": 4, "checkpoint_every": 12, "log_every": 4}
    spec = make_job(tiny_model_dir, reverse_data, storage, {"name": "lora", "r": 4, "alpha": 8}, name="console-lora", training=training)
    result = run_training(spec, fit=fit_in_process)  # runs the console lists; their worker loop in this process
    failing = make_job(tiny_model_dir, reverse_data, storage, {"name": "lora", "r": 4, "alpha": 8}, name="console-fails",
                       training=training, resources={"max_failures": 0})
    failed_id = f"console-fails-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TrainingFailed):
        run_training(failing, run_id=failed_id, faults={"fail_at_step": 2}, fit=fit_in_process)
    other = build_random_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("console") / "rand", seed=5, r=4)
    registry.publish("console-rand", other, kind="adapter", base_model=str(tiny_model_dir), base_config_digest=digest,
                     method="lora", params={}, metrics={}, lineage={"test": "console"})
    merge_adapters(MergeOptions(sources=["console-lora@1", "console-rand@1"], into="console-both", method="cat"), registry)

    app = f"console{uuid.uuid4().hex[:8]}"
    serve_spec = parse_serve_spec({
        "storage": storage,
        "base": {"name": "tiny", "source": "registry:tiny", "deployment": {"replicas": 1, "cpus": 0.5},
                 "batch": {"max_batch_size": 8, "max_wait_ms": 5}},
        "api": {"auth": {"token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()]}, "max_tokens_limit": 64,
                "deployment": {"cpus": 0.1}},
    }, "console test spec")
    serve.run(build_app(serve_spec), name=app, route_prefix=f"/{app}")
    history = json.loads(registry.read_file("console-lora@1", "history.json"))
    yield Console(url=f"{serve_http}/{app}", app=app, storage=storage, run_id=result.run_id, failed_run_id=failed_id, history=history)
    serve.delete(app)


@pytest.fixture(scope="module")
def browser(console):
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    b = Browser()
    yield b
    b.close()


def signed_in(browser: Browser, console: Console, path: str = "/console/runs") -> None:
    """Open `path`, signing in first if the page asks for the token."""
    browser.get(f"{console.url}{path}")
    browser.wait("return document.querySelector('#login') || document.querySelector('#who button');", what="login or a page")
    if browser.run("return !!document.querySelector('#login');"):
        browser.type("#token", TOKEN)
        browser.click("#sign-in")
        browser.wait_for("#sign-out")


def loaded(browser: Browser, css: str) -> None:
    browser.wait("return !!document.querySelector(arguments[0]) || !!document.querySelector('main .error');", css, what=css)
    error = browser.text("main .error")
    assert error is None, error




@pytest.mark.slow
def test_wrong_token_is_refused(console, browser):
    browser.get(f"{console.url}/console/runs")
    browser.run("sessionStorage.clear();")
    browser.get(f"{console.url}/console/runs")
    browser.wait_for("#login")
    browser.type("#token", "not-the-token")
    browser.click("#sign-in")
    browser.wait_for("#login .error")
    assert "invalid bearer token" in browser.text("#login .error")
    assert browser.run("return document.querySelector('#runs');") is None
    assert TOKEN not in browser.run("return location.href;")
    browser.screenshot(SCREENSHOTS / "login-refused.png")
    # the data routes answer 401 without the token, the page itself holds no data
    assert httpx.get(f"{console.url}/console/api/runs").status_code == 401
    assert httpx.get(f"{console.url}/console/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
    page = httpx.get(f"{console.url}/console/runs")
    assert page.status_code == 200 and console.run_id not in page.text and "script-src 'self'" in page.headers["content-security-policy"]


@pytest.mark.slow
def test_runs_page_lists_the_runs(console, browser):
    signed_in(browser, console)
    loaded(browser, "#runs")
    rows = browser.run("return [...document.querySelectorAll('#runs tr[data-run]')].map(r => [r.dataset.run, r.querySelector('[data-state]').dataset.state]);")
    assert [console.run_id, "succeeded"] in rows and [console.failed_run_id, "failed"] in rows
    assert "console-lora@1" in browser.text(f"#runs tr[data-run='{console.run_id}']")
    assert TOKEN not in browser.run("return location.href;")
    browser.screenshot(SCREENSHOTS / "runs.png")


@pytest.mark.slow
def test_run_page_draws_the_history(console, browser):
    signed_in(browser, console, f"/console/runs/{console.run_id}")
    loaded(browser, "svg [data-series='train_loss']")
    points = browser.run("return Object.fromEntries([...document.querySelectorAll('svg[data-chart=loss] g[data-series]')]"
                         ".map(g => [g.dataset.series, g.querySelectorAll('circle').length]));")
    assert points["train_loss"] == len([h for h in console.history if h.get("train_loss") is not None]) == 3
    assert points["eval_loss"] == len([h for h in console.history if h.get("eval_loss") is not None])
    assert "[rayft] step 12/12" in browser.text("#log-tail")
    assert json.loads(browser.text("#spec"))["output"]["name"] == "console-lora"
    assert browser.run("return document.querySelectorAll('#checkpoints tr').length;") == 2  # header + step 12
    browser.screenshot(SCREENSHOTS / "run.png")

    signed_in(browser, console, f"/console/runs/{console.failed_run_id}")
    browser.wait_for("#run-error")
    assert "injected failure at step 2" in browser.text("#run-error")
    browser.screenshot(SCREENSHOTS / "run-failed.png")


@pytest.mark.slow
def test_registry_shows_the_lineage_of_a_merged_adapter(console, browser):
    signed_in(browser, console, "/console/registry")
    loaded(browser, "#registry")
    assert browser.text("#registry tr[data-ref='console-both@1'] .made-from") == "merged from console-lora@1, console-rand@1"
    browser.screenshot(SCREENSHOTS / "registry.png")
    browser.click("#registry tr[data-ref='console-both@1'] td:nth-child(2) a")
    loaded(browser, "#lineage")
    lineage = browser.run("return [...document.querySelectorAll('#lineage li')].map(li => li.dataset.lineage);")
    assert lineage == ["console-both@1", "console-lora@1", "console-rand@1"]
    assert console.run_id in browser.text("#lineage li[data-lineage='console-lora@1']")
    assert browser.run("return document.querySelectorAll('#files tr').length;") > 2
    browser.screenshot(SCREENSHOTS / "version.png")


@pytest.mark.slow
def test_playground_answers_like_the_openai_client(console, browser):
    from openai import OpenAI

    signed_in(browser, console, "/console/playground")
    loaded(browser, "#run")
    browser.run("document.querySelector('#model-0').value = 'console-lora'; document.querySelector('#model-1').value = 'tiny';")
    browser.type("#prompt", PROMPT)
    browser.type("#max-tokens", "6")
    browser.type("#temperature", "0")
    browser.click("#run")
    browser.wait("return document.querySelector('#status-0').dataset.done && document.querySelector('#status-1').dataset.done;", what="both answers")
    client = OpenAI(base_url=f"{console.url}/v1", api_key=TOKEN, max_retries=0)
    for pane, model in ((0, "console-lora"), (1, "tiny")):
        expected = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        assert browser.text(f"#out-{pane}") == expected
    browser.screenshot(SCREENSHOTS / "playground.png")


@pytest.mark.slow
def test_compare_search_and_jobs_pages(console, browser):
    signed_in(browser, console, f"/console/compare?items=run:{console.run_id},version:console-lora@1")
    loaded(browser, "#compare")
    assert browser.run("return document.querySelectorAll('svg[data-chart=compare-eval] g[data-series]').length;") == 2
    browser.screenshot(SCREENSHOTS / "compare.png")
    signed_in(browser, console, "/console/search")
    browser.wait_for("main .empty")
    assert "rayft tune" in browser.text("main .empty")
    browser.screenshot(SCREENSHOTS / "search-empty.png")
    signed_in(browser, console, "/console/jobs")  # this app has no fine-tuning API: the page says how to add it
    browser.wait_for("main .empty")
    assert "no fine-tuning API" in browser.text("main .empty")
    browser.screenshot(SCREENSHOTS / "jobs-no-api.png")


@pytest.mark.slow
def test_unknown_ids_are_404_and_hostile_ids_never_reach_storage(console, browser):
    for path, says in ((f"/console/runs/no-such-run", "run 'no-such-run' does not exist"),
                       ("/console/registry/console-lora/9", "console-lora@9 is not in the registry"),
                       ("/console/search/no-such-search", "does not exist")):
        signed_in(browser, console, path)
        browser.wait_for("main .error")
        assert browser.run("return document.querySelector('main .error').dataset.status;") == "404"
        assert says in browser.text("main .error")
    browser.screenshot(SCREENSHOTS / "not-found.png")

    before = console.storage_requests()
    with httpx.Client(base_url=console.url, headers=console.headers) as client:
        # percent-encoded as a browser sends them (".." as a whole segment would be resolved by the client itself)
        for run_id in [quote(i, safe="") for i in HOSTILE_RUN_IDS if i != ".."] + ["%2e%2e", "..%2F..%2Fregistry", "a%00b"]:
            status = client.get(f"/console/api/runs/{run_id}").status_code
            assert status in (400, 404), run_id
            assert client.get(f"/console/api/searches/{run_id}").status_code in (400, 404), run_id
        for name, version in (("..", "1"), ("Tiny", "1"), ("tiny", "0"), ("tiny", "1e3"), ("%2e%2e", "1")):
            assert client.get(f"/console/api/registry/{name}/{version}").status_code in (400, 404)
        for path in ("/console/static/..%2Fconsole.py", "/console/static/%2e%2e%2fconsole.py", "/console/static/console.html"):
            response = client.get(path)  # only the two named files are served: anything else is 404 or the page shell
            assert response.status_code in (200, 404) and "console_router" not in response.text, path
    assert console.storage_requests() == before
