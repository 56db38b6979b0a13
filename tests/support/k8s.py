"""The manifests in k8s/ as documents, and a RayService's Serve application (its serveConfigV2)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"


def manifest_documents() -> list[tuple[str, dict]]:
    """Every non-empty YAML document in k8s/*.yaml, as (id, document)."""
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                name = doc.get("metadata", {}).get("name", "?")
                documents.append((f"{path.name}#{index}:{doc.get('kind')}/{name}", doc))
    return documents


#: The RayServices by name.
SERVICES = {doc["metadata"]["name"]: doc for _, doc in manifest_documents() if doc.get("kind") == "RayService"}


def serve_config(service_name: str) -> dict:
    return yaml.safe_load(SERVICES[service_name]["spec"]["serveConfigV2"])


def serve_builder(service_name: str):
    """The RayService's application builder (its import_path, imported) and the args it is given."""
    (application,) = serve_config(service_name)["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    # Fails loudly (no skip): a RayService whose import path does not resolve never deploys.
    module = importlib.import_module(module_name)
    assert hasattr(module, attribute), f"{module_name} has no attribute {attribute!r}"
    return getattr(module, attribute), application.get("args", {})
