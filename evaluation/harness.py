"""lm-evaluation-harness tasks from a local directory, scored through rayft's model actors (extra `lm-eval`).

For people who already have harness tasks: `rayft eval REF --lm-eval-tasks DIR --tasks NAME[,NAME]`
indexes only the task YAML files under DIR (never the harness's built-in tasks), loads their data
with Hugging Face's offline switches on (a task must name local files, e.g. `dataset_path: json` with
`dataset_kwargs.data_files`), and runs the harness's own evaluator with `RayftLM` as the model. RayftLM
(evaluation/harness_lm.py) turns the harness's requests into rayft eval items, so the answers and
log-likelihoods come from the same model actors as `rayft eval --data` (serve's engine, one base load
per ref); the harness only formats prompts and computes its metrics.

lm_eval is imported only here, after `require_lm_eval()`: rayft works without the extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.actors import actor_class, run_group
from evaluation.runner import EvalError, Target, actor_settings, group_targets
from trainers.eval_spec import EvalSpec

INSTALL_HINT = "pip install 'rayft[lm-eval]'"
_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def require_lm_eval() -> None:
    """EvalError (one line, with the install command) when the optional extra is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(f"--lm-eval-tasks needs lm-evaluation-harness, which is not installed: install it with {INSTALL_HINT}") from None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face datasets/hub in offline mode while harness tasks load (nothing is downloaded).

    The env switches are read when `datasets`/`huggingface_hub` are imported; if they already were,
    their module-level flags are set too. Everything is restored afterwards.
    """
    saved_env = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update({k: "1" for k in _OFFLINE})
    flags: list[tuple[Any, str, Any]] = []
    for module_name, names in (("datasets.config", _OFFLINE), ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        module = sys.modules.get(module_name)
        for name in names if module is not None else ():
            if hasattr(module, name):
                flags.append((module, name, getattr(module, name)))
                setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in flags:
            setattr(module, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_tasks(directory: str | Path, names: list[str]) -> Any:
    """The harness's TaskManager over `directory` alone, after checking every task is there and its data loads.

    EvalError names a missing task (with the tasks the directory has) or a task whose data is not local."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise EvalError(f"--lm-eval-tasks {directory}: not a directory; give the folder holding your harness task YAML files")
    if not names:
        raise EvalError("--lm-eval-tasks needs --tasks NAME[,NAME] (the `task:` names in its YAML files)")
    with offline():
        manager = TaskManager(include_path=str(root), include_defaults=False)
        missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            have = ", ".join(manager.all_tasks) or "none"
            raise EvalError(f"--tasks: no harness task named {', '.join(missing)} under {root} (tasks there: {have})")
        try:  # loads each task's data now, so a bad YAML or non-local data is reported before Ray starts
            manager.load(names)
        except Exception as err:  # the harness and datasets raise many types; each is a problem of the task files
            raise EvalError(
                f"harness task {', '.join(names)} under {root} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "its data must be local files (dataset_path: json with dataset_kwargs.data_files), nothing is downloaded"
            ) from err
    return manager


@dataclass
class HarnessReport:
    """The harness's metrics of each ref on the same tasks, and its logged samples."""

    directory: str
    tasks: list[str]
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # label → task → metric → value
    samples: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # label → task → harness samples

    def metric(self, label: str, task: str, name: str) -> float:
        """One metric value, e.g. metric(ref, "my_task", "acc") (the harness's "acc,none")."""
        values = self.results[label][task]
        key = name if name in values else f"{name},none"
        return float(values[key])

    def table(self) -> str:
        """task / metric (filter) × refs, value ± the harness's standard error."""
        labels = list(self.results)
        header = ["task", "metric"] + labels
        body = []
        for task in self.tasks:
            first = self.results[labels[0]].get(task, {})
            for key in first:
                # sample_len is the harness's row count, not a metric
                if "_stderr," in key or key in ("alias", "sample_len") or not isinstance(first[key], (int, float)):
                    continue
                name, _, filt = key.partition(",")
                line = [task, name if filt in ("", "none") else f"{name} ({filt})"]
                for lab in labels:
                    value = self.results[lab][task][key]
                    err = self.results[lab][task].get(f"{name}_stderr,{filt}")
                    line.append(f"{value:.3f}" + (f" ± {err:.3f}" if isinstance(err, (int, float)) else ""))
                body.append(line)
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + body]
        lines.append(f"lm-evaluation-harness tasks from {self.directory}; ± the harness's standard error")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"tasks_dir": self.directory, "tasks": self.tasks, "refs": self.results}

    def samples_jsonl(self) -> str:
        """Each ref's logged samples (doc, target, the model's responses, per-row metrics), one JSON object a line."""
        lines = []
        for label, tasks in self.samples.items():
            for task, rows in tasks.items():
                for row in rows:
                    lines.append(json.dumps({"ref": label, "task": task} | row, ensure_ascii=False, default=str))
        return "\n".join(lines) + "\n"


def ray_executor(group: Any, settings: dict[str, Any], actors: int) -> Callable[[list[dict]], list[dict]]:
    """Items through Ray Data on the group's model actors (what `rayft eval` uses)."""
    return lambda items: run_group(group, items, settings, actors=actors)


def in_process_executor(group: Any, settings: dict[str, Any]) -> Callable[[list[dict]], list[dict]]:
    """Items through one model actor object in this process (the same class Ray Data runs; no Ray needed)."""
    actor = actor_class(settings)(group, settings)
    size = settings["batch_size"]

    def run(items: list[dict]) -> list[dict]:
        out = []
        for start in range(0, len(items), size):
            batch = {"item": [json.dumps(it) for it in items[start : start + size]]}
            out += [json.loads(text) for text in actor(batch)["item"]]
        return out

    return run


def run_harness(targets: list[Target], directory: str | Path, tasks: list[str], spec: EvalSpec, *, storage_uri: str,
                in_process: bool = False) -> HarnessReport:
    """The harness's evaluator on `tasks` from `directory`, once per ref, with rayft's model actors answering.

    `in_process` runs one model actor in this process instead of a Ray Data pool (small checks, no cluster)."""
    manager = load_tasks(directory, tasks)
    from lm_eval import simple_evaluate

    from evaluation.harness_lm import RayftLM

    settings = actor_settings(spec)
    report = HarnessReport(str(directory), list(tasks))
    for target in targets:
        (group,) = group_targets([target], storage_uri, spec.engine)
        run = in_process_executor(group, settings) if in_process else ray_executor(group, settings, spec.actors)
        lm = RayftLM(target.label, run, max_tokens=spec.max_tokens)
        with offline():
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True,
                                  bootstrap_iters=spec.bootstrap, limit=spec.max_rows, random_seed=spec.seed,
                                  numpy_random_seed=spec.seed, torch_random_seed=spec.seed, fewshot_random_seed=spec.seed)
        report.results[target.label] = {t: out["results"][t] for t in out["results"]}
        report.samples[target.label] = out.get("samples", {})
    return report
