"""The project's import graph, read from every module's `ast` (no imports run): no circles, the floors of
DESIGN.md hold, and project imports sit at the top of files unless the allow-list below says why one is lazy.

Floors: storage/ imports none of the others; trainers/ and serve/ never import each other; serve/ never imports
the top floor (service/, evaluation/, cluster/); service/ uses only cluster's library part (cluster/client/), whose
modules import neither the CLI nor service/. Third-party imports (torch, ray, transformers, vllm, deepspeed,
bitsandbytes, peft, ...) may sit anywhere: keeping them lazy is how `rayft --help` stays light.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "trainers", "serve", "storage", "evaluation", "service")
CLIENT = "cluster.client"
#: Project imports inside functions that stay there, as (importing module, imported module) patterns (fnmatch) with
#: the reason. Every other project import sits at the top of its file.
LAZY: list[tuple[str, str, str]] = [
    ("cluster.commands.*", "*", "CLI start-up: `rayft --help` imports every command module to build its parser, so a "
                                "command's dependencies (Ray, the trainers, the serving app) load only when it runs"),
    ("cluster.serve_demo", "*", "CLI start-up: the demo's serving half, imported by `rayft demo` when it serves"),
    ("evaluation.generate", "serve.*", "the model actor's engine (serve.deployments imports Ray Serve): loaded in the "
                                       "Ray Data actor's process, not by the driver that plans the evaluation"),
    ("evaluation.generate", "storage.*", "the model actor's model and registry: loaded in the Ray Data actor"),
    ("evaluation.vllm_actor", "*", "the vLLM actor: nothing of vLLM or the engine in the driver (this module's promise)"),
    ("evaluation.harness", "evaluation.harness_lm", "lm-eval is an optional extra (`rayft[lm-eval]`): harness_lm "
                                                    "subclasses its LM at import"),
    ("serve.app", "serve.vllm_server", "Ray Serve LLM and vLLM take seconds to import: only for `engine: vllm`"),
    ("serve.vllm_engine", "serve.vllm_cpu_lora", "imports vLLM's kernels: only in a vLLM replica on CPU"),
    ("trainers.run", "*", "not moved in this change: trainers/run.py is under edit beside it"),
    ("trainers.loop", "*", "not moved in this change: trainers/loop.py is under edit beside it"),
    ("trainers.batches", "*", "not moved in this change: trainers/batches.py is under edit beside it"),
]


def lazy_reason(importer: str, target: str) -> str | None:
    return next((why for who, what, why in LAZY if fnmatch.fnmatchcase(importer, who) and fnmatch.fnmatchcase(target, what)),
                None)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def project_imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for each import statement of the module; `from x import y`
    names module x.y when that is a module, else x. `if TYPE_CHECKING:` blocks are left out (they never run)."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit(orelse, in_function)
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _closest(alias.name, known)
                    if target:
                        found.append((target, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, name, path.name == "__init__.py")
                for alias in child.names:
                    target = _closest(f"{base}.{alias.name}", known) or _closest(base, known)
                    if target:
                        found.append((target, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def _closest(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    found = modules()
    known = set(found)
    return {name: [(t, line, lazy) for t, line, lazy in project_imports(name, path, known) if t != name]
            for name, path in found.items()}


def _package_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _floor(name: str) -> str:
    if name == CLIENT or name.startswith(CLIENT + "."):
        return CLIENT
    return name.split(".")[0]


#: (importer's floor, imported floor) pairs that are forbidden.
FORBIDDEN = {
    **{("storage", other): "storage/ imports nothing above it" for other in PACKAGES + (CLIENT,) if other != "storage"},
    ("trainers", "serve"): "trainers/ and serve/ never import each other",
    ("serve", "trainers"): "trainers/ and serve/ never import each other",
    **{("serve", top): "serve/ never calls up" for top in ("service", "evaluation", "cluster", CLIENT)},
    ("service", "cluster"): "service/ uses only cluster's library part (cluster/client/), never the CLI",
    (CLIENT, "cluster"): "cluster/client/ is below the CLI: it never imports it",
    (CLIENT, "service"): "cluster/client/ is below service/: it never imports it",
    **{(low, top): "trainers/ and storage/ never import the top floor" for low in ("trainers",)
       for top in ("service", "evaluation", "cluster", CLIENT)},
}


def test_the_graph_sees_the_project():
    g = graph()
    assert {"cluster.cli", "storage.registry", "service.app", "evaluation.runner", "serve.app"} <= set(g)
    assert any(t == "storage.registry" for t, _, _ in g["serve.app"])


def test_no_import_circles():
    """Top-level and function-level imports both: an import inside a function hides a circle, it does not break it."""
    edges: dict[str, set[str]] = {}
    for name, imports in graph().items():
        targets = edges.setdefault(name, set())
        for target, _, _ in imports:
            targets.add(target)
            targets.update(p for p in _package_parents(target) if p != name and not name.startswith(p + "."))
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_floors_hold():
    broken = []
    for name, imports in graph().items():
        for target, line, _ in imports:
            reason = FORBIDDEN.get((_floor(name), _floor(target)))
            if reason:
                broken.append(f"{name}:{line} imports {target}: {reason}")
    assert broken == []


def test_the_cli_entry_point_and_the_client_library():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rayft"] == "cluster.cli:main"
    g = graph()
    assert {t for t, _, _ in g["service.jobs"] if t.startswith("cluster")} <= {m for m in g if _floor(m) == CLIENT}
    assert (ROOT / "cluster" / "client" / "ray_data_logging.yaml").is_file()  # the console's Ray Data logging config


def test_project_imports_sit_at_the_top():
    lazy = sorted({(name, target, line) for name, imports in graph().items() for target, line, inside in imports if inside})
    unexplained = [f"{name}:{line} imports {target} inside a function" for name, target, line in lazy
                   if lazy_reason(name, target) is None]
    assert unexplained == [], "move these imports to the top of the file, or add them to LAZY with the reason"
    stale = [(who, what) for who, what, _ in LAZY
             if not any(fnmatch.fnmatchcase(n, who) and fnmatch.fnmatchcase(t, what) for n, t, _ in lazy)]
    assert stale == [], f"LAZY lists imports that are no longer lazy: {stale}"


@pytest.mark.parametrize("edges,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_find_cycle(edges, cycle):
    assert find_cycle(edges) == cycle
