"""`VllmActor`: the model actor of `engine: vllm` evaluations. vLLM's own offline engine (`vllm.LLM`) decodes,
with its continuous batching and multi-LoRA kernels; rayft only lays out the requests and reads the results.

The actor is the same Ray Data callable as evaluation.generate.ModelActor (items in, results out), so
`run_group`, the runner and the harness do not change with the engine. One actor holds one base and every
LoRA adapter of the group: registry adapters come through serve's verified path (`fetch_adapter`, checked
against the base and vLLM's kernels by `adapter_problems`, copied by `materialize_adapter` into an immutable
folder vLLM loads); local adapter directories are written from the bytes the driver shipped.

Log-likelihoods are vLLM's prompt log-probabilities, one request per engine call: on CPU, vLLM 0.29 computes
the logits of a request's prompt tokens with the sampler's per-request LoRA indices, which fails for a batch
of several prompt-logprob requests; a single request broadcasts its one index (rayft's plugin
`serve.vllm_cpu_lora` gives a base request none).

Importing this module imports nothing of vLLM; the actor does, in its own process.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from evaluation.data import parse_row
from evaluation.generate import GENERATE, ModelGroup, decoding, prompt_ids, score_item


class VllmActor:
    """A Ray Data callable class: one vLLM engine on one base, every LoRA adapter of the group loaded on demand."""

    def __init__(self, group: ModelGroup, settings: dict[str, Any]):
        from transformers import AutoTokenizer

        from serve.vllm_engine import _derived_rank, require_cpu_lora_fix
        from storage.models import read_model_config, resolve_model_dir

        if settings["gpus"] == 0:
            # vLLM's CPU backend sizes its KV cache from the environment.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings["kv_cache_gib"])
        # The engine runs in this actor's process (no engine-core and worker processes to spawn: 10 s to the
        # first answer instead of 24 on 2 cores), and says only what went wrong (its console lines would
        # bury rayft's progress).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        model_dir = resolve_model_dir(group.base_source, group.storage_uri)
        config = read_model_config(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.group, self.settings = group, settings
        self._dir = tempfile.TemporaryDirectory(prefix="rayft-eval-vllm-")
        folders, ranks = self._adapter_folders(group, model_dir, config)
        self.max_model_len = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
        kwargs: dict[str, Any] = {
            "dtype": settings["dtype"] if settings["dtype"] != "auto" else ("bfloat16" if settings["gpus"] else "float32"),
            "max_model_len": self.max_model_len,
            "max_num_seqs": settings["batch_size"],
            # CPU: no graph capture or compilation to wait for (seconds per shape on 2 cores, nothing gained on tiny batches).
            "enforce_eager": settings["gpus"] == 0,
            "seed": settings["seed"],
            "distributed_executor_backend": "uni",
        }
        if folders:
            kwargs |= {"enable_lora": True, "max_lora_rank": _derived_rank(ranks), "max_loras": len(folders),
                       "max_cpu_loras": len(folders)}
        require_cpu_lora_fix(kwargs)
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.llm = LLM(model=model_dir, tokenizer=model_dir, **kwargs)
        # vLLM numbers adapters from 1; each label keeps its id for the actor's life (an eval never evicts).
        self.loras = {label: LoRARequest(label, i + 1, str(folder)) for i, (label, folder) in enumerate(folders.items())}

    def _adapter_folders(self, group: ModelGroup, model_dir: str, config: dict) -> tuple[dict[str, Path], list[int]]:
        """label → the folder vLLM loads it from, and the adapters' LoRA ranks (to size the kernels)."""
        from serve.adapters import AdapterNotServable, adapter_problems, fetch_adapter, lora_rank
        from serve.vllm_engine import materialize_adapter, weight_shapes
        from storage.registry import base_config_digest, open_registry

        folders: dict[str, Path] = {}
        ranks: list[int] = []
        registry = open_registry(group.storage_uri)
        digest = base_config_digest(config)
        shapes = weight_shapes(model_dir)
        for label, adapter in group.adapters.items():
            if isinstance(adapter, str):  # a registry ref: verified download, checked against this base and vLLM
                directory, manifest, adapter_config = fetch_adapter(registry, adapter)
                problems = adapter_problems(manifest, adapter_config, directory, base_name=group.base_source,
                                            base_digest=digest, shapes=shapes, policy=None, vllm_max_rank=512)
                if problems:
                    raise AdapterNotServable(f"adapter {manifest.ref} cannot be evaluated by vLLM: " + "; ".join(problems))
                folders[label] = materialize_adapter(directory, manifest, Path(self._dir.name) / "registry")
            else:  # a local directory's files, shipped by the driver
                folder = Path(self._dir.name) / "local" / str(len(folders))
                for rel, data in adapter.items():
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    (folder / rel).write_bytes(data)
                adapter_config = json.loads((folder / "adapter_config.json").read_text())
                folders[label] = folder
            ranks.append(lora_rank(adapter_config))
        return folders, ranks

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        items = [json.loads(text) for text in batch["item"]]
        return {"item": [json.dumps(r) for r in self._process(items)]}

    def _lora(self, label: str) -> Any:
        return None if label == self.group.base_label else self.loras[label]

    def _process(self, items: list[dict]) -> list[dict]:
        from vllm import SamplingParams

        results = [{"key": it["key"], "label": it["label"]} for it in items]
        rows = [parse_row(it["row"], it["key"], f"row {it['key'] + 1}") for it in items]
        asks = [(i, it) for i, it in enumerate(items) if GENERATE in it["want"]]
        prompts, params, loras = [], [], []
        for i, item in asks:
            p = decoding(self.settings, item)
            ids = prompt_ids(self.tokenizer, rows[i], self.max_model_len - p["max_tokens"])
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(max_tokens=p["max_tokens"], temperature=p["temperature"], stop=list(p["stop"]) or None,
                                         seed=p["seed"], skip_special_tokens=True))
            loras.append(self._lora(item["label"]))
        if prompts:
            # One call for the whole batch: vLLM schedules the sequences together, adapters mixed.
            outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            for (i, _), param, output in zip(asks, params, outputs):
                out = output.outputs[0]
                results[i]["answer"] = answer_text(self.tokenizer, list(out.token_ids), param.stop or [])
                results[i]["finish_reason"] = "stop" if out.finish_reason == "stop" else "length"
        for result, item, row in zip(results, items, rows):
            if set(item["want"]) - {GENERATE}:
                lora = self._lora(item["label"])
                result.update(score_item(self.tokenizer, row, item, lambda c, conts: self._scores(c, conts, lora),
                                         self.max_model_len - 1))
        return results

    def _scores(self, context: list[int], continuations: list[list[int]], lora: Any) -> list[tuple[float, int, bool]]:
        """(Σ log P(continuation | context), tokens, greedy would produce it) from vLLM's prompt log-probabilities."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
        results = []
        for cont in continuations:
            # One request per call: see the module's docstring (vLLM's CPU LoRA logits with prompt logprobs).
            (output,) = self.llm.generate([{"prompt_token_ids": context + cont}], params, lora_request=lora, use_tqdm=False)
            picked = [output.prompt_logprobs[len(context) + j][token] for j, token in enumerate(cont)]
            results.append((float(sum(p.logprob for p in picked)), len(cont), all(p.rank == 1 for p in picked)))
        return results


def answer_text(tokenizer: Any, ids: list[int], stop: list[str]) -> str:
    """The answer the transformers engine gives for these tokens (serve.generation.TextStream: the whole decode,
    cut before the first stop string), so both engines answer alike for the same tokens; vLLM's own text leaves
    out bytes of a character its last tokens did not complete."""
    from serve.generation import TextStream

    stream = TextStream(tokenizer, tuple(stop))
    text, stopped = stream.update(ids)
    return text if stopped else text + stream.flush(ids)
