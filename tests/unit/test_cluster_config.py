"""The `ray up` config in cluster/ray-cluster.yaml: valid for Ray's cluster launcher and for
EC2, holding no credentials, and running commands that refer to things that exist.

Nothing here contacts AWS or starts Ray: the checks are Ray's own autoscaler schema and config
preparation (what `ray up` runs before it talks to the cloud), botocore's EC2 model, and the
installed `ray start` command definition.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO / "cluster" / "ray-cluster.yaml"
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def load_config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


@functools.cache
def ray_autoscaler_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def schema_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_autoscaler_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def test_config_matches_rays_autoscaler_schema() -> None:
    assert schema_errors(load_config()) == []


def test_schema_check_rejects_a_misspelt_field() -> None:
    config = load_config()
    config["available_node_types"]["qlora-24gb"]["max_worker"] = 8
    assert any("max_worker" in p for p in schema_errors(config))


def test_config_survives_ray_ups_own_preparation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # `ray up` fills in the provider's defaults, merges the setup commands, then validates:
    # all of it local, before any cloud call.
    prepared = prepare_config(copy.deepcopy(load_config()))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


@functools.cache
def run_instances_input() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


@pytest.mark.parametrize("node_type", sorted(load_config()["available_node_types"]))
def test_node_config_is_a_valid_ec2_run_instances_request(node_type: str) -> None:
    from botocore.validate import ParamValidator

    node_config = load_config()["available_node_types"][node_type]["node_config"]
    # Ray's AWS provider passes node_config to RunInstances and adds the counts itself.
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, run_instances_input())
    assert not report.has_errors(), report.generate_report()
    instance_types = run_instances_input().members["InstanceType"].enum
    assert node_config["InstanceType"] in instance_types, f"{node_config['InstanceType']} is not an EC2 instance type"


def test_node_types_fit_their_jobs() -> None:
    node_types = load_config()["available_node_types"]
    assert node_types["head"]["resources"] == {"CPU": 0}, "no training or serving work on the head"
    zero3, qlora = node_types["zero3-a100x8"], node_types["qlora-24gb"]
    assert zero3["resources"]["GPU"] == 8 and re.match(r"p(4d|4de|5|5e|5en)\.", zero3["node_config"]["InstanceType"])
    assert qlora["resources"]["GPU"] == 1 and re.match(r"g(5|6|6e)\.", qlora["node_config"]["InstanceType"])
    for name, node_type in node_types.items():
        if name != "head":
            assert node_type["min_workers"] == 0, f"{name}: GPU nodes should scale from zero"


def test_ray_node_labels_are_valid() -> None:
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    for node_type in load_config()["available_node_types"].values():
        validate_node_labels(node_type.get("labels", {}))
        validate_node_label_syntax(node_type.get("labels", {}))


def test_no_credentials_in_the_config() -> None:
    text = CONFIG_PATH.read_text()
    assert not AWS_KEY_ID.search(text), "an AWS access key id is in the config"
    # A credential variable may be filled from a command or variable ("$(...)"), never a literal.
    literal = re.findall(r"\b([A-Z_]*(?:SECRET|TOKEN|PASSWORD|ACCESS_KEY)[A-Z_]*)=(?![\"']?\$)", text)
    assert not literal, f"{literal} assigned inline in {CONFIG_PATH.name}"
    config = load_config()
    assert "ssh_private_key" not in config.get("auth", {})
    for name, node_type in config["available_node_types"].items():
        # Credentials reach the nodes only through their instance profile.
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: no instance profile"


def test_image_is_rays_own_at_the_installed_versions() -> None:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert load_config()["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{py}-gpu"


def test_setup_installs_rayft_from_the_synced_checkout() -> None:
    config = load_config()
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        # `ray up` runs from the repository root, so local paths are relative to it.
        assert (REPO / local).exists(), f"file_mounts source {local} does not exist"
    installs = [shlex.split(c) for c in config["setup_commands"] if c.startswith("pip install")]
    assert installs, "no setup command installs rayft"
    for argv in installs:
        targets = [a for a in argv[2:] if not a.startswith("-")]
        for target in targets:
            assert target in mounts, f"`pip install {target}`: not a file_mounts destination"
            pyproject = tomllib.loads((REPO / mounts[target] / "pyproject.toml").read_text())
            assert pyproject["project"]["name"] == "rayft"
    # The venv and the git history are large and useless on the nodes.
    assert {".venv", ".git"} <= set(config["rsync_exclude"])


def test_setup_puts_the_token_where_ray_looks_for_it() -> None:
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    default = _get_default_token_path().relative_to(Path.home())
    setup = " ".join(load_config()["setup_commands"])
    assert f"> ~/{default.as_posix()}" in setup, f"the token should be written to ~/{default}"


@functools.cache
def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt.split("=")[0] for p in start.params for opt in [*p.opts, *p.secondary_opts]}


def ray_start_invocations(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, flags) of each `ray start` in shell command lines."""
    found = []
    for command in commands:
        for part in re.split(r";|&&", command):
            argv = shlex.split(part)
            env = {}
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                key, _, value = argv.pop(0).partition("=")
                env[key] = value
            if argv[:2] == ["ray", "start"]:
                found.append((env, [a for a in argv[2:] if a.startswith("--")]))
    return found


@pytest.mark.parametrize("field", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_use_real_flags_and_token_auth(field: str) -> None:
    config = load_config()
    invocations = ray_start_invocations(config[field])
    assert len(invocations) == 1, f"{field}: expected one `ray start`"
    env, flags = invocations[0]
    unknown = {f.split("=")[0] for f in flags} - ray_start_options()
    assert not unknown, f"{field}: `ray start` has no {sorted(unknown)}"
    assert env.get("RAY_AUTH_MODE") == "token", f"{field}: start Ray with RAY_AUTH_MODE=token"
    assert env.get("RAYFT_STORAGE", "").startswith("s3://"), f"{field}: RAYFT_STORAGE must name the shared store"
    if field == "head_start_ray_commands":
        # The Jobs API runs arbitrary code: reachable only through the SSH tunnel.
        assert "--dashboard-host=127.0.0.1" in flags
        # Where `ray up` writes the launcher config on the head.
        from ray.autoscaler._private import commands

        assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in flags
        assert "~/ray_bootstrap_config.yaml" in inspect.getsource(commands)


def test_start_command_parser_sees_a_misspelt_flag() -> None:
    ((_, flags),) = ray_start_invocations(["RAY_AUTH_MODE=token ray start --dashbaord-host=0.0.0.0"])
    assert {f.split("=")[0] for f in flags} - ray_start_options() == {"--dashbaord-host"}
