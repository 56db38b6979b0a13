"""The CLI as a new user types it (issue 14, part 2): push a peft adapter or transformers model made outside
rayft, pull it back out, options after the action, and `rayft validate` for every spec kind.

Adapters here are built with plain peft (`get_peft_model` + `save_pretrained`) on the tiny model, never
through rayft's trainers, so the push path sees exactly what a user brings from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from cluster.cli import build_parser, main
from storage.registry import base_config_digest_of_dir, open_registry

REPO = Path(__file__).resolve().parents[2]
PROMPT = "reverse apple ="


def plain_peft_adapter(base_dir: Path, out: Path, seed: int, *, r: int = 4, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter written by plain peft; B is random (peft starts it at zero) so it changes answers."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def greedy(model, tokenizer, prompt: str = PROMPT, n: int = 6) -> list[int]:
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def rayft(capsys, *args: str) -> tuple[int, str, str]:
    """`rayft ARGS` through the CLI's entry point: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The CLI's own error line (library warnings on stderr are not rayft's)."""
    lines = [line for line in err.splitlines() if line.startswith("rayft ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def store(local_uri: str, tiny_model_dir: Path, capsys) -> str:
    """A local registry holding the tiny base model, pushed through the CLI as a plain transformers dir."""
    code, out, _ = rayft(capsys, "registry", "push", str(tiny_model_dir), "--name", "tiny", "--kind", "model", "--storage", local_uri)
    assert code == 0 and out.startswith("published tiny@1 (model"), out
    return local_uri


# --------------------------------------------------------------------------- 1 + 2: push and pull


def test_push_plain_peft_adapter_then_pull_loads_with_peft(store, tiny_model_dir, tmp_path, capsys):
    import peft
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = plain_peft_adapter(tiny_model_dir, tmp_path / "adapter", seed=1, r=4)
    code, out, err = rayft(capsys, "registry", "push", str(adapter), "--name", "outside", "--kind", "adapter",
                           "--base-model", "registry:tiny", "--storage", store)
    assert code == 0, err
    assert "published outside@1 (adapter, base registry:tiny@1" in out
    manifest = open_registry(store).resolve("outside")
    assert manifest.base_model == "registry:tiny@1"  # pinned, so a later version of tiny does not change its base
    assert manifest.base_config_digest == base_config_digest_of_dir(tiny_model_dir)
    assert manifest.method is None and manifest.params["peft_type"] == "LORA" and manifest.params["r"] == 4
    assert manifest.params["target_modules"] == ["q_proj", "v_proj"]

    code, out, err = rayft(capsys, "registry", "pull", "outside@1", str(tmp_path / "pulled"), "--storage", store)
    assert code == 0, err
    assert "pulled outside@1" in out and "verified against the manifest" in out
    pulled = tmp_path / "pulled"
    assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in adapter.iterdir())
    for original in adapter.iterdir():
        assert (pulled / original.name).read_bytes() == original.read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(pulled)).eval()
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    got, want = get_peft_model_state_dict(loaded), get_peft_model_state_dict(reference)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert greedy(loaded, tokenizer) == greedy(reference, tokenizer) != greedy(base, tokenizer)

    # A pull never overwrites: a non-empty directory is refused.
    code, _, err = rayft(capsys, "registry", "pull", "outside", str(pulled), "--storage", store)
    assert code == 2 and "exists and is not an empty directory" in error_line(err)


def test_push_adapter_takes_its_base_from_adapter_config_or_a_local_dir(store, tiny_model_dir, tmp_path, capsys):
    adapter = plain_peft_adapter(tiny_model_dir, tmp_path / "adapter", seed=2)
    # adapter_config.json names the base directory peft saw: used when --base-model is not given.
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    code, out, err = rayft(capsys, "registry", "push", str(adapter), "--name", "implicit", "--kind", "adapter", "--storage", store)
    assert code == 0, err
    manifest = open_registry(store).resolve("implicit")
    assert manifest.base_model == str(tiny_model_dir.resolve())
    assert manifest.base_config_digest == base_config_digest_of_dir(tiny_model_dir)

    # A base whose adapter_config.json names a directory that is gone: one line saying to pass --base-model.
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    code, _, err = rayft(capsys, "registry", "push", str(adapter), "--name", "orphan", "--kind", "adapter", "--storage", store)
    assert code == 2 and "--base-model registry:NAME[@V]" in error_line(err)


def _bad_adapter(kind: str, tiny_model_dir: Path, work: Path) -> Path:
    adapter = plain_peft_adapter(tiny_model_dir, work / "bad", seed=3)
    weights = adapter / "adapter_model.safetensors"
    if kind == "pickle":
        weights.rename(adapter / "adapter_model.bin")
    elif kind == "gguf":
        weights.rename(adapter / "adapter.gguf")
    elif kind == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif kind == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif kind == "no-peft-type":
        config = json.loads((adapter / "adapter_config.json").read_text())
        del config["peft_type"]
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.parametrize(("kind", "base", "reason"), [
    ("pickle", "registry:tiny", "pickle-based weight files"),
    ("gguf", "registry:tiny", "format rayft does not load (adapter.gguf)"),
    ("garbage", "registry:tiny", "is not a valid safetensors file"),
    ("no-config", "registry:tiny", "has no adapter_config.json"),
    ("no-peft-type", "registry:tiny", "has no peft_type"),
    ("ok", "registry:missing", "no published version of 'missing'"),
    ("ok", "registry:tiny@7", "tiny@7 is not published"),
])
def test_push_refuses_bad_adapters_with_one_line_and_publishes_nothing(store, tiny_model_dir, tmp_path, capsys, kind, base, reason):
    adapter = _bad_adapter(kind, tiny_model_dir, tmp_path)
    code, out, err = rayft(capsys, "registry", "push", str(adapter), "--name", "bad", "--kind", "adapter",
                           "--base-model", base, "--storage", store)
    assert code == 2 and out == ""
    assert reason in error_line(err)
    assert [m.name for m in open_registry(store).list()] == ["tiny"]


def test_push_adapter_onto_an_adapter_base_is_refused(store, tiny_model_dir, tmp_path, capsys):
    adapter = plain_peft_adapter(tiny_model_dir, tmp_path / "a", seed=4)
    assert rayft(capsys, "registry", "push", str(adapter), "--name", "first", "--kind", "adapter", "--base-model", "registry:tiny", "--storage", store)[0] == 0
    code, _, err = rayft(capsys, "registry", "push", str(adapter), "--name", "second", "--kind", "adapter",
                         "--base-model", "registry:first", "--storage", store)
    assert code == 2 and "the base must be a published model" in error_line(err)


@pytest.mark.parametrize(("kind", "reason"), [
    ("pickle", "pickle-based weight files"),
    ("no-weights", "has no *.safetensors weights"),
    ("no-config", "has no config.json"),
    ("adapter", "it is a peft adapter, push it with --kind adapter"),
])
def test_push_refuses_bad_models_with_one_line(local_uri, tiny_model_dir, tmp_path, capsys, kind, reason):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if kind == "pickle":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif kind == "no-weights":
        (model / "model.safetensors").unlink()
    elif kind == "no-config":
        (model / "config.json").unlink()
    elif kind == "adapter":
        (model / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    code, _, err = rayft(capsys, "registry", "push", str(model), "--name", "m", "--kind", "model", "--storage", local_uri)
    assert code == 2 and reason in error_line(err)
    assert open_registry(local_uri).list() == []


def test_pull_of_a_tampered_artifact_fails_and_writes_nothing(store, tmp_path, capsys, monkeypatch):
    # An empty download cache: a verified copy cached by an earlier test would (rightly) be used instead.
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path / "home"))
    registry = open_registry(store)
    registry.store.put_bytes(b"tampered", "registry/tiny/1/files/config.json")
    code, _, err = rayft(capsys, "registry", "pull", "tiny", str(tmp_path / "out"), "--storage", store)
    assert code == 2 and "integrity check failed" in error_line(err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 3: options where people type them


def test_registry_options_work_before_and_after_the_action(store, capsys):
    for args in (["registry", "list", "--storage", store], ["registry", "--storage", store, "list"],
                 ["registry", "show", "tiny", "--storage", store], ["registry", "--storage", store, "show", "tiny@1"]):
        code, out, err = rayft(capsys, *args)
        assert code == 0, (args, err)
        assert "tiny" in out


def _groups(parser: argparse.ArgumentParser):
    """(command, group parser, {action: action parser}) for every command that has actions."""
    for command, sub in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            yield command, sub, nested[0].choices


def test_every_command_group_takes_its_options_after_the_action_too():
    groups = list(_groups(build_parser()))
    assert {command for command, _, _ in groups} >= {"registry", "jobs"}
    for command, group, actions in groups:
        options = {s for a in group._actions if a.option_strings and a.dest != "help" for s in a.option_strings}
        for action, action_parser in actions.items():
            missing = options - set(action_parser._option_string_actions)
            assert not missing, f"`rayft {command} {action}` does not accept {sorted(missing)} after the action"


# --------------------------------------------------------------------------- 4: validate every spec kind


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_validate_recognises_every_example(path, capsys):
    code, out, err = rayft(capsys, "validate", str(REPO / "examples" / path))
    assert code == 0, err
    expected = {"serve.yaml": "serve spec", "serve-vllm.yaml": "serve spec", "tune-lora.yaml": "tune job"}.get(path, "job spec")
    assert out.startswith(f"OK: {REPO / 'examples' / path}: {expected}:"), out


def test_validate_lists_every_problem_of_a_bad_serve_spec(tmp_path, capsys):
    bad = tmp_path / "serve.yaml"
    bad.write_text(
        "base:\n  name: Tiny Llama\n  source: registry:tiny\n  deployment: {replicas: 0}\n"
        "merged:\n  - name: m1\napi:\n  max_tokens_limit: 0\n  tokens: 3\n"
    )
    code, out, err = rayft(capsys, "validate", str(bad))
    assert code == 2 and out == ""
    assert f"{bad}: 5 problem(s):" in err
    for line in ("base.name: got 'Tiny Llama'", "base.deployment.replicas: got 0, must be ≥ 1",
                 "merged[0]: got {'name': 'm1'}, set exactly one of source", "api.max_tokens_limit: got 0, must be ≥ 1",
                 "api.tokens: got 3, unknown field; check the spelling against serve/spec.py"):
        assert line in err


def test_validate_kind_can_be_forced_and_a_tune_job_needs_its_section(capsys):
    code, _, err = rayft(capsys, "validate", str(REPO / "examples" / "lora.yaml"), "--kind", "tune")
    assert code == 2 and "has no tune: section" in err
    code, _, err = rayft(capsys, "validate", str(REPO / "examples" / "lora.yaml"), "--kind", "serve")
    assert code == 2 and "base: required field is missing" in err
    code, out, _ = rayft(capsys, "validate", str(REPO / "examples" / "tune-lora.yaml"), "--kind", "job")
    assert code == 0 and ": job spec:" in out


# --------------------------------------------------------------------------- 1 end to end: serve and merge it


@pytest.mark.slow
def test_pushed_adapter_serves_and_merges_like_a_trained_one(serve_http, s3_server, tiny_model_dir, tmp_path, capsys):
    """Push a base and two plain-peft adapters to S3 with the CLI, serve them (multiplexed and merged at load)
    on real Serve, answer through the openai client as peft does, and merge them with `rayft merge`."""
    import uuid

    import peft
    from openai import OpenAI
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.app import build_app
    from serve.spec import parse_serve_spec

    bucket = f"rayft-push-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(bucket)
    storage = f"s3://{bucket}/store"
    assert rayft(capsys, "registry", "push", str(tiny_model_dir), "--name", "tiny", "--storage", storage)[0] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {}
    for i, name in enumerate(["ext-a", "ext-b"]):
        adapter = plain_peft_adapter(tiny_model_dir, tmp_path / name, seed=10 + i)
        code, _, err = rayft(capsys, "registry", "push", str(adapter), "--name", name, "--kind", "adapter",
                             "--base-model", "registry:tiny", "--storage", storage)
        assert code == 0, err
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
        expected[name] = tokenizer.decode(greedy(model, tokenizer), skip_special_tokens=True)
    assert expected["ext-a"] != expected["ext-b"]

    spec = parse_serve_spec({
        "storage": storage,
        "base": {"name": "tiny", "source": "registry:tiny", "deployment": {"cpus": 0.5}},
        "merged": [{"name": "ext-b-merged", "adapter": "ext-b", "deployment": {"cpus": 0.5}}],
        "api": {"deployment": {"cpus": 0.1}},
    }, "push test")
    app = f"pushtest{uuid.uuid4().hex[:8]}"
    serve.run(build_app(spec), name=app, route_prefix=f"/{app}")
    try:
        client = OpenAI(base_url=f"{serve_http}/{app}/v1", api_key="unused", max_retries=0)
        for model, want in (("ext-a", expected["ext-a"]), ("ext-b", expected["ext-b"]), ("ext-b-merged", expected["ext-b"])):
            reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
            assert reply.choices[0].text == want, model
    finally:
        serve.delete(app)

    code, out, err = rayft(capsys, "merge", "ext-a", "ext-b", "--into", "ext-ab", "--method", "linear", "--storage", storage)
    assert code == 0, err
    assert "published ext-ab@1 (adapter" in out
    code, _, err = rayft(capsys, "registry", "pull", "ext-ab", str(tmp_path / "ab"), "--storage", storage)
    assert code == 0, err
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "ab")).eval()
    assert len(greedy(merged, tokenizer)) == 6
