"""The KubeRay manifests in k8s/: valid against their schemas (strictly), safe by policy,
and pointing at things that exist (job files, the Serve import path, the image's layout).

Nothing here starts Ray or talks to a cluster: the schemas are the KubeRay CRDs in
../shared/kuberay-crds (skipped, with the reason, where that folder is absent), the
Kubernetes core schemas shipped by `kubernetes-validate`, and Ray's own Serve and CLI
definitions from the installed `ray`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from pydantic import BaseModel

from tests.support.k8s import K8S_DIR, SERVICES, manifest_documents, serve_builder, serve_config

REPO = Path(__file__).resolve().parents[2]
# The repository's parent holds shared/ (in CI the clone has ../shared beside it).
CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# Core schemas: the oldest Kubernetes minor still commonly run, so a field the manifests use
# has to exist there too.
K8S_VERSION = "1.30"
SECRETS_TEMPLATE = K8S_DIR / "secrets.example.yaml"
PLACEHOLDER = "REPLACE_ME"
AUTH_TOKEN_KEY = "auth_token"  # KubeRay's key for the token in authOptions.secretName
# Pod-spec fields the autoscaler sidecar takes from autoscalerOptions.
AUTOSCALER_CONTAINER_FIELDS = (
    "image", "imagePullPolicy", "command", "args", "env", "envFrom",
    "resources", "securityContext", "volumeMounts",
)
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
# Env names whose values are credentials: allowed only from a Secret.
SENSITIVE_ENV = re.compile(r"ACCESS_KEY|SECRET|TOKEN|PASSWORD")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _load_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as f:
        return yaml.load(f, Loader=loader)


DOCUMENTS = manifest_documents()
RAY_DOCUMENTS = [(i, d) for i, d in DOCUMENTS if d.get("kind") in CRD_FILES]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]


def documents_param(documents: list[tuple[str, dict]]):
    return pytest.mark.parametrize("doc", [d for _, d in documents], ids=[i for i, _ in documents])


# ---------------------------------------------------------------- walking a Ray resource


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """The RayClusterSpec(s) inside a RayCluster / RayJob / RayService, with their paths."""
    spec = doc.get("spec", {})
    kind = doc.get("kind")
    if kind == "RayCluster":
        return [("spec", spec)]
    if kind == "RayJob" and "rayClusterSpec" in spec:
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if kind == "RayService":
        return [("spec.rayClusterConfig", spec["rayClusterConfig"])]
    return []


def ray_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Pod templates whose first container runs a Ray node (head and worker groups)."""
    templates = []
    for path, spec in cluster_specs(doc):
        templates.append((f"{path}.headGroupSpec.template", spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            templates.append((f"{path}.workerGroupSpecs[{group['groupName']}].template", group["template"]))
    return templates


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template in the resource: Ray nodes, plus a RayJob's submitter."""
    templates = ray_pod_templates(doc)
    if doc.get("kind") == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(("spec.submitterPodTemplate", doc["spec"]["submitterPodTemplate"]))
    return templates


def autoscaler_containers(doc: dict) -> list[tuple[str, dict]]:
    """The autoscaler sidecar KubeRay adds to the head, as the container autoscalerOptions make."""
    containers = []
    for path, spec in cluster_specs(doc):
        if spec.get("enableInTreeAutoscaling"):
            options = spec.get("autoscalerOptions", {})
            container = {"name": "autoscaler", "image": "autoscaler"}
            container.update({k: options[k] for k in AUTOSCALER_CONTAINER_FIELDS if k in options})
            containers.append((f"{path}.autoscalerOptions", container))
    return containers


def all_containers(doc: dict) -> list[tuple[str, dict]]:
    """Every container the resource makes: template containers, init containers, autoscaler."""
    containers = []
    for path, template in pod_templates(doc):
        pod_spec = template.get("spec", {})
        for field in ("initContainers", "containers"):
            for container in pod_spec.get(field, []):
                containers.append((f"{path}.spec.{field}[{container.get('name')}]", container))
    return containers + autoscaler_containers(doc)


def ray_containers(doc: dict) -> list[tuple[str, dict]]:
    """Containers that talk to Ray and so need its token: nodes, autoscaler, job submitter."""
    containers = []
    for path, template in pod_templates(doc):
        for container in template.get("spec", {}).get("containers", []):
            containers.append((f"{path}[{container.get('name')}]", container))
    return containers + autoscaler_containers(doc)


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def head_container(spec: dict) -> dict:
    # KubeRay treats the first container of the head template as the Ray container.
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------- strict CRD schemas


def closed(schema: dict) -> dict:
    """A copy of an OpenAPI schema where every object that lists `properties` (and does not
    preserve unknown fields) rejects other fields, as the API server's strict field
    validation (kubectl's default) does. The published CRDs leave them open."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = closed(out["items"])
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in out:
            out[combinator] = [closed(sub) for sub in out[combinator]]
    if isinstance(out.get("not"), dict):
        out["not"] = closed(out["not"])
    return out


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    crd = _load_yaml(CRD_DIR / CRD_FILES[kind])
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{CRD_FILES[kind]} has no version {version!r}")


@functools.cache
def crd_validator(kind: str, version: str, strict: bool = True) -> jsonschema.Draft7Validator:
    schema = crd_schema(kind, version)
    return jsonschema.Draft7Validator(closed(schema) if strict else schema)


def crd_errors(doc: dict, strict: bool = True) -> list[str]:
    group, _, version = doc["apiVersion"].partition("/")
    assert group == "ray.io", f"unexpected apiVersion {doc['apiVersion']!r}"
    validator = crd_validator(doc["kind"], version, strict)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def core_error(resource: dict) -> str | None:
    """The first strict core-schema error in a whole Kubernetes resource, or None."""
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return f"{'.'.join(map(str, err.path)) or '<root>'}: {err.message}"
    return None


def as_pod_template(template: dict) -> dict:
    # kubernetes-validate checks whole resources; a PodTemplate carries exactly a template.
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def as_pod(container: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [container]}}


def as_config_map(metadata: dict) -> dict:
    # The CRDs leave metadata open; a ConfigMap checks ObjectMeta strictly.
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}


needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRD schemas not found at {CRD_DIR} (shared/ is absent)"
)


@documents_param(DOCUMENTS)
def test_document_matches_its_schema_strictly(doc: dict) -> None:
    if doc.get("kind") in CRD_FILES:
        if not CRD_DIR.is_dir():
            pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (shared/ is absent)")
        problems = crd_errors(doc)
        metadata_problem = core_error(as_config_map(doc["metadata"]))
        problems += [f"metadata: {metadata_problem}"] if metadata_problem else []
    else:
        problem = core_error(doc)
        problems = [problem] if problem else []
    assert not problems, "\n".join(problems)


@documents_param(RAY_DOCUMENTS)
def test_embedded_pods_match_kubernetes_core_schema(doc: dict) -> None:
    problems = []
    for path, template in pod_templates(doc):
        if problem := core_error(as_pod_template(template)):
            problems.append(f"{path}: {problem}")
    for path, container in autoscaler_containers(doc):
        if problem := core_error(as_pod(container)):
            problems.append(f"{path}: {problem}")
    assert pod_templates(doc), "no pod template found"
    assert not problems, "\n".join(problems)


def _raycluster() -> dict:
    (doc,) = by_kind("RayCluster")
    return copy.deepcopy(doc)


@needs_crds
def test_strict_check_rejects_an_unknown_field_a_plain_check_accepts() -> None:
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParamz"] = {"num-cpus": "0"}
    assert crd_errors(doc, strict=False) == [], "the published CRD is open: this is why strict checking is needed"
    problems = crd_errors(doc)
    assert any("rayStartParamz" in p for p in problems), problems


@needs_crds
def test_strict_check_rejects_a_typo_inside_a_pod_spec() -> None:
    doc = _raycluster()
    template = doc["spec"]["workerGroupSpecs"][0]["template"]
    template["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    problems = crd_errors(doc)
    assert any("runAsNonRot" in p for p in problems), problems
    assert "runAsNonRot" in (core_error(as_pod_template(template)) or "")


def test_core_check_rejects_a_typo_in_a_secret() -> None:
    secret = copy.deepcopy(by_kind("Secret")[0])
    secret["stringDta"] = secret.pop("stringData")
    assert "stringDta" in (core_error(secret) or "")


# ----------------------------------------------------------------------- Serve config


services_param = pytest.mark.parametrize("service_name", sorted(SERVICES))


def unknown_fields(raw: dict, model: BaseModel, path: str) -> list[str]:
    """Keys of `raw` the parsed pydantic `model` has no field for (Serve's deploy schema
    ignores them for forward compatibility, so a typo would be silently dropped)."""
    fields = type(model).model_fields
    names = {name: name for name in fields} | {f.alias: name for name, f in fields.items() if f.alias}
    problems = []
    for key, value in raw.items():
        if key not in names:
            problems.append(f"{path}.{key}")
            continue
        parsed = getattr(model, names[key])
        if isinstance(parsed, BaseModel) and isinstance(value, dict):
            problems += unknown_fields(value, parsed, f"{path}.{key}")
        elif isinstance(parsed, list) and isinstance(value, list):
            for i, (item, raw_item) in enumerate(zip(parsed, value)):
                if isinstance(item, BaseModel) and isinstance(raw_item, dict):
                    problems += unknown_fields(raw_item, item, f"{path}.{key}[{i}]")
    return problems


def serve_config_problems(config: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(config)
    return unknown_fields(config, parsed, "serveConfigV2")


@services_param
def test_serve_config_matches_ray_serve_schema(service_name: str) -> None:
    assert serve_config_problems(serve_config(service_name)) == []


def test_serve_config_check_rejects_a_misspelt_field() -> None:
    config = serve_config("rayft-serve")
    config["applications"][0]["route_prefx"] = "/v1"
    assert serve_config_problems(config) == ["serveConfigV2.applications[0].route_prefx"]


@services_param
def test_serve_http_runs_on_the_head_on_the_serve_port(service_name: str) -> None:
    config = serve_config(service_name)
    service = SERVICES[service_name]
    head = head_container(service["spec"]["rayClusterConfig"])
    ports = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}
    assert config["proxy_location"] == "HeadOnly"
    # KubeRay's Serve Service targets the head port named "serve".
    assert ports.get("serve") == config["http_options"]["port"]


# ---------------------------------------------------------------------------- policy


def _secret_refs(node: Any, path: str = "") -> Iterator[tuple[str, str, str | None, bool]]:
    """(path, secret name, key or None for a whole-Secret envFrom, optional) for every reference."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            ref = node["secretKeyRef"]
            yield path, ref["name"], ref["key"], bool(ref.get("optional"))
        if "secretRef" in node:
            ref = node["secretRef"]
            yield path, ref["name"], None, bool(ref.get("optional"))
        for key, value in node.items():
            yield from _secret_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _secret_refs(value, f"{path}[{i}]")


@documents_param(RAY_DOCUMENTS)
def test_no_inline_credentials(doc: dict) -> None:
    problems = []
    for path, container in all_containers(doc):
        for name, entry in env_of(container).items():
            if SENSITIVE_ENV.search(name) and "secretKeyRef" not in entry.get("valueFrom", {}):
                problems.append(f"{path}: {name} must come from a Secret (valueFrom.secretKeyRef), not inline")
    for path, spec in cluster_specs(doc):
        for field in ("redisPassword", "redisUsername"):
            if "value" in spec.get("gcsFaultToleranceOptions", {}).get(field, {}):
                problems.append(f"{path}.gcsFaultToleranceOptions.{field}.value is inline: use valueFrom")
    text = yaml.safe_dump(doc)
    if AWS_KEY_ID.search(text):
        problems.append("an AWS access key id appears in the manifest")
    assert not problems, "\n".join(problems)


def test_manifest_files_hold_no_aws_keys() -> None:
    for path in [*K8S_DIR.iterdir()]:
        if path.is_file():
            assert not AWS_KEY_ID.search(path.read_text()), f"{path.name} holds an AWS access key id"


def test_secret_template_holds_placeholders_only() -> None:
    secrets = by_kind("Secret")
    assert {s["metadata"]["name"] for s in secrets} >= {"rayft-ray-auth", "rayft-s3", "rayft-redis"}
    for secret in secrets:
        assert "data" not in secret, "use stringData with placeholders, never encoded values"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key} is not a placeholder: {value!r}"


def test_every_referenced_secret_key_is_in_the_template() -> None:
    provided = {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind("Secret")}
    problems = []
    for doc_id, doc in RAY_DOCUMENTS:
        for path, name, key, optional in _secret_refs(doc):
            if optional:
                continue
            if name not in provided:
                problems.append(f"{doc_id}{path}: Secret {name!r} is not in {SECRETS_TEMPLATE.name}")
            elif key is not None and key not in provided[name]:
                problems.append(f"{doc_id}{path}: key {key!r} of Secret {name!r} is not in {SECRETS_TEMPLATE.name}")
    assert not problems, "\n".join(problems)


@documents_param(RAY_DOCUMENTS)
def test_every_container_has_requests_and_limits(doc: dict) -> None:
    problems = []
    for path, container in all_containers(doc):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(bound, {}))
            if missing:
                problems.append(f"{path}: no {bound} for {sorted(missing)}")
        for name, amount in resources.get("limits", {}).items():
            # Extended resources (GPUs) cannot be overcommitted: request must equal limit.
            if "/" in name and resources.get("requests", {}).get(name) != amount:
                problems.append(f"{path}: {name} request differs from its limit {amount}")
    assert not problems, "\n".join(problems)


@documents_param(RAY_DOCUMENTS)
def test_pods_run_as_non_root_without_privilege_escalation(doc: dict) -> None:
    problems = []
    for path, template in pod_templates(doc):
        pod_security = template.get("spec", {}).get("securityContext", {})
        if pod_security.get("runAsNonRoot") is not True or pod_security.get("runAsUser") != 1000:
            problems.append(f"{path}.spec.securityContext: needs runAsNonRoot: true and runAsUser: 1000")
    for path, container in all_containers(doc):
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{path}: needs securityContext.allowPrivilegeEscalation: false")
        if security.get("privileged"):
            problems.append(f"{path}: privileged")
        if security.get("runAsUser", 1000) == 0 or security.get("runAsNonRoot") is False:
            problems.append(f"{path}: runs as root")
    for path, container in autoscaler_containers(doc):
        if container.get("securityContext", {}).get("runAsNonRoot") is not True:
            # The sidecar's pod-level context is KubeRay's head pod; say it on the container.
            problems.append(f"{path}: needs securityContext.runAsNonRoot: true")
    assert not problems, "\n".join(problems)


@documents_param(RAY_DOCUMENTS)
def test_dashboard_and_jobs_api_stay_inside_the_cluster(doc: dict) -> None:
    problems = []
    for path, spec in cluster_specs(doc):
        head = spec["headGroupSpec"]
        if head.get("serviceType") != "ClusterIP":
            problems.append(f"{path}.headGroupSpec.serviceType must be ClusterIP, not {head.get('serviceType')!r}")
        if head.get("enableIngress"):
            problems.append(f"{path}.headGroupSpec.enableIngress exposes the dashboard")
        if head.get("headService", {}).get("spec", {}).get("type") in EXPOSED_SERVICE_TYPES:
            problems.append(f"{path}.headGroupSpec.headService exposes the head")
    if doc.get("spec", {}).get("serveService", {}).get("spec", {}).get("type") in EXPOSED_SERVICE_TYPES:
        problems.append("spec.serveService exposes Serve outside the cluster")
    assert not problems, "\n".join(problems)


def test_no_service_document_exposes_a_node_port_or_load_balancer() -> None:
    for service in by_kind("Service"):
        assert service.get("spec", {}).get("type", "ClusterIP") not in EXPOSED_SERVICE_TYPES


@documents_param(RAY_DOCUMENTS)
def test_token_auth_on_every_ray_container(doc: dict) -> None:
    problems = []
    for path, spec in cluster_specs(doc):
        auth = spec.get("authOptions", {})
        if auth.get("mode") != "token" or not auth.get("secretName"):
            problems.append(f"{path}.authOptions: needs mode: token and a secretName")
    secret_names = {spec.get("authOptions", {}).get("secretName") for _, spec in cluster_specs(doc)}
    for path, container in ray_containers(doc):
        env = env_of(container)
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{path}: RAY_AUTH_MODE=token missing")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") not in secret_names or ref.get("key") != AUTH_TOKEN_KEY:
            problems.append(f"{path}: RAY_AUTH_TOKEN must come from Secret {secret_names} key {AUTH_TOKEN_KEY!r}")
    assert not problems, "\n".join(problems)


def test_token_auth_variables_are_the_ones_ray_reads() -> None:
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    # The token variable is read by Ray's C++ loader; its name is in the shipped library.
    raylet = next(Path(ray.__file__).parent.glob("_raylet*.so"))
    assert b"RAY_AUTH_TOKEN\x00" in raylet.read_bytes()


@services_param
def test_rayservice_has_gcs_fault_tolerance_from_a_secret(service_name: str) -> None:
    service = SERVICES[service_name]
    spec = service["spec"]["rayClusterConfig"]
    options = spec["gcsFaultToleranceOptions"]
    assert re.fullmatch(r"[A-Za-z0-9.-]+:\d+", options["redisAddress"]), options["redisAddress"]
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    # KubeRay refuses these next to gcsFaultToleranceOptions.
    assert "redis-password" not in spec["headGroupSpec"].get("rayStartParams", {})
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & set(env_of(head_container(spec)))


@functools.cache
def ray_start_options() -> dict[str, bool]:
    """`ray start`'s option names (without dashes) -> whether it is an on/off flag."""
    from ray.scripts.scripts import start

    options = {}
    for param in start.params:
        for opt in [*param.opts, *param.secondary_opts]:
            options[opt.lstrip("-")] = bool(getattr(param, "is_flag", False))
    return options


@documents_param(RAY_DOCUMENTS)
def test_ray_start_params_are_real_ray_start_options(doc: dict) -> None:
    options = ray_start_options()
    # KubeRay turns "true" into a bare flag and drops "false", except for these.
    valued_booleans = {"log-color", "include-dashboard", "include-log-monitor"}
    problems = []
    for path, spec in cluster_specs(doc):
        groups = [("headGroupSpec", spec["headGroupSpec"])]
        groups += [(f"workerGroupSpecs[{g['groupName']}]", g) for g in spec.get("workerGroupSpecs", [])]
        for where, group in groups:
            for key, value in group.get("rayStartParams", {}).items():
                if key not in options:
                    problems.append(f"{path}.{where}.rayStartParams: `ray start` has no --{key}")
                elif value.lower() in ("true", "false") and key not in valued_booleans and not options[key]:
                    problems.append(f"{path}.{where}.rayStartParams.{key}: KubeRay would pass it without a value")
    assert not problems, "\n".join(problems)


@documents_param(RAY_DOCUMENTS)
def test_ray_node_labels_are_valid(doc: dict) -> None:
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    for _, spec in cluster_specs(doc):
        for group in spec.get("workerGroupSpecs", []):
            validate_node_labels(group.get("labels", {}))
            validate_node_label_syntax(group.get("labels", {}))


def test_worker_groups_fit_their_jobs() -> None:
    spec = by_kind("RayCluster")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpus = {
        name: int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for name, g in groups.items()
    }
    assert gpus == {"zero3-a100x8": 8, "qlora-24gb": 1}
    for _, doc in RAY_DOCUMENTS:
        for path, cluster in cluster_specs(doc):
            for g in cluster.get("workerGroupSpecs", []):
                assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (
                    f"{path}.workerGroupSpecs[{g['groupName']}]: replicas outside [minReplicas, maxReplicas]"
                )


def test_every_ray_node_keeps_artifacts_in_the_shared_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.store import default_storage_uri

    uris = set()
    for _, doc in RAY_DOCUMENTS:
        for path, template in ray_pod_templates(doc):
            entry = env_of(template["spec"]["containers"][0]).get("RAYFT_STORAGE", {})
            # Without it rayft would use the pod's local disk, lost with the pod.
            assert entry.get("value", "").startswith("s3://"), f"{path}: RAYFT_STORAGE must name an s3:// store"
            uris.add(entry["value"])
    assert len(uris) == 1, f"every node should share one store, found {uris}"
    (uri,) = uris
    monkeypatch.setenv("RAYFT_STORAGE", uri)
    assert default_storage_uri() == uri, "rayft no longer reads RAYFT_STORAGE"


def test_rayjobs_clean_up_after_themselves() -> None:
    jobs = by_kind("RayJob")
    assert len(jobs) == 2
    for job in jobs:
        spec = job["spec"]
        name = job["metadata"]["name"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{name}: one of rayClusterSpec/clusterSelector"
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["activeDeadlineSeconds"] > 0, name
        assert spec["backoffLimit"] >= 0, name


# ------------------------------------------------------- what the manifests point at


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (K8S_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def image_workdir() -> str:
    return [arg for op, arg in dockerfile_instructions() if op == "WORKDIR"][-1]


def test_image_is_rays_own_at_the_installed_versions() -> None:
    (base,) = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    images = set()
    for _, doc in RAY_DOCUMENTS:
        for _, spec in cluster_specs(doc):
            assert spec["rayVersion"] == ray.__version__
        images |= {c["image"] for path, c in ray_containers(doc) if not path.endswith("autoscalerOptions")}
    assert len(images) == 1, f"every Ray pod should run the one rayft image, found {images}"


def test_dockerfile_copies_paths_that_exist() -> None:
    for op, arg in dockerfile_instructions():
        if op == "COPY":
            sources = [a for a in shlex.split(arg) if not a.startswith("--")][:-1]
            for source in sources:
                if "*" not in source:
                    assert (REPO / source).exists(), f"k8s/Dockerfile copies {source}, which is not in the repository"


def test_ray_containers_work_in_the_images_checkout() -> None:
    workdir = image_workdir()
    for _, doc in RAY_DOCUMENTS:
        for path, template in ray_pod_templates(doc):
            container = template["spec"]["containers"][0]
            # Job drivers inherit `ray start`'s working directory; entrypoints are relative to it.
            assert container.get("workingDir") == workdir, f"{path}: workingDir should be {workdir}"


def job_entrypoints() -> list[tuple[str, list[str]]]:
    return [(job["metadata"]["name"], shlex.split(job["spec"]["entrypoint"])) for job in by_kind("RayJob")]


def job_files() -> list[str]:
    return [argv[2] for _, argv in job_entrypoints() if len(argv) >= 3]


@pytest.mark.parametrize("name,argv", job_entrypoints(), ids=[n for n, _ in job_entrypoints()])
def test_entrypoint_runs_a_rayft_command_on_a_file_in_the_repo(name: str, argv: list[str]) -> None:
    from cluster.cli import COMMANDS

    assert argv[0] == "rayft" and len(argv) == 3, f"{name}: expected `rayft <command> <file>`, got {argv}"
    assert argv[1] in COMMANDS, f"{name}: `rayft {argv[1]}` is not a rayft command ({COMMANDS})"
    # The image copies the repository's examples/ to its working directory, so a path
    # relative to the repository root is the path the driver opens.
    assert (REPO / argv[2]).is_file(), f"{name}: {argv[2]} does not exist in the repository"


@pytest.mark.parametrize("job_file", job_files())
def test_job_file_passes_rayft_validate(job_file: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from cluster.cli import main

    monkeypatch.chdir(REPO)  # the driver in the image runs in the repository's copy: job files name data relative to it
    code = main(["validate", job_file])
    out, err = capsys.readouterr()
    assert code == 0, f"rayft validate {job_file} exited {code}:\n{err}{out}"


def _quantity(value: Any) -> float:
    return float(str(value).rstrip("m")) / 1000 if str(value).endswith("m") else float(value)


@pytest.mark.parametrize("name,argv", job_entrypoints(), ids=[n for n, _ in job_entrypoints()])
def test_job_cluster_has_room_for_the_job(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from trainers.spec import load_job_spec

    (job,) = [j for j in by_kind("RayJob") if j["metadata"]["name"] == name]
    assert (REPO / argv[2]).is_file(), f"{name}: {argv[2]} does not exist in the repository"
    monkeypatch.chdir(REPO)  # job files name their data relative to the working directory
    spec = load_job_spec(argv[2])
    gpus = cpus = 0.0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["maxReplicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
        cpus += group["maxReplicas"] * _quantity(limits["cpu"])
    workers = spec.resources.num_workers
    assert workers <= gpus, f"{name}: {argv[2]} wants {workers} workers (one GPU each); the cluster has {gpus:g} GPUs"
    assert workers * (spec.resources.cpus_per_worker or 1) <= cpus, f"{name}: not enough CPUs for {workers} workers"
    # The manifest's name says what the job does; the job file must agree.
    if "zero3" in name:
        assert spec.resolved_strategy() == "deepspeed_zero3", f"{name}: {argv[2]} does not run ZeRO-3"
    if "qlora" in name:
        assert spec.method.name == "qlora", f"{name}: {argv[2]} is not a QLoRA job"


@services_param
def test_serve_import_path_resolves_to_an_application_builder(service_name: str) -> None:
    builder, _ = serve_builder(service_name)
    assert inspect.isfunction(builder), f"{builder!r} should be an application builder function"
    assert len(inspect.signature(builder).parameters) == 1, "Serve passes `args` as the builder's one argument"


def test_one_rayservice_per_engine_and_the_image_carries_vllm() -> None:
    engines = {name: serve_config(name)["applications"][0]["args"].get("engine", "transformers") for name in SERVICES}
    assert engines == {"rayft-serve": "transformers", "rayft-serve-vllm": "vllm"}
    vllm_spec = SERVICES["rayft-serve-vllm"]["spec"]["rayClusterConfig"]
    base = serve_config("rayft-serve-vllm")["applications"][0]["args"]["base"]["deployment"]
    for group in vllm_spec["workerGroupSpecs"]:  # whole GPUs per vLLM replica, and room for them
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= base["gpus"] >= 1
        assert _quantity(limits["cpu"]) >= base["cpus"]
    installs = " ".join(arg for op, arg in dockerfile_instructions() if op == "RUN")
    assert re.search(r"pip install [^&]*'?\.\[vllm\]'?", installs), "k8s/Dockerfile should install rayft's vllm extra (GPU vLLM)"
