"""A served application's client-side view (URL, token, expected answers) and ways to call it, shared by the transformers and vLLM serving tests."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from storage.registry import Manifest
from storage.store import sha256_file


TOKEN = "serve-test-token"


@dataclass
class Served:
    url: str  # the application's root (its route prefix on the proxy)
    app: str
    storage: str
    tokenizer: object
    expected: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # model -> prompt -> greedy tokens
    adapter_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=TOKEN, max_retries=0)

    def base_stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("BaseModel", self.app).stats.remote().result()

    def api_stats(self) -> dict:
        from ray import serve

        return serve.get_app_handle(self.app).stats.remote().result()


def _publish_pickle_only(registry, name: str, work: Path, digest: str) -> None:
    """An adapter whose weights exist only as a pickle: written past `publish`, which would refuse it."""
    files = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}).encode(),
             "adapter_model.bin": b"\x80\x04pickle-not-loaded"}
    entries = []
    for path, data in files.items():
        registry.store.put_bytes(data, f"registry/{name}/1/files/{path}")
        local = work / path
        local.write_bytes(data)
        sha, size = sha256_file(local)
        entries.append({"path": path, "sha256": sha, "size": size})
    manifest = Manifest(name=name, version=1, kind="adapter", base_model="tiny", base_config_digest=digest, method="lora",
                        params={}, metrics={}, lineage={}, files=entries, created_at="2026-01-01T00:00:00Z")
    registry.store.put_bytes(manifest.model_dump_json().encode(), f"registry/{name}/1/manifest.json")


async def post_all(served: Served, bodies: list[dict], concurrency: int = 64, retry_503_for: float = 0.0) -> list[httpx.Response]:
    """POST every body to /v1/completions at once (at most `concurrency` in flight)."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, headers=served.headers) as client:
        async def one(body: dict) -> httpx.Response:
            async with limit:
                deadline = time.monotonic() + retry_503_for
                while True:
                    try:
                        response = await client.post(f"{served.url}/v1/completions", json=body)
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
                        continue
                    if response.status_code != 503 or time.monotonic() > deadline:
                        return response
                    await asyncio.sleep(0.5)

        return await asyncio.gather(*(one(b) for b in bodies))
