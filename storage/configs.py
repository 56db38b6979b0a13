"""User config files (job specs, serve specs, merge options) read and reported one way.

Every layer validates its own pydantic models; this module turns pydantic's errors into
`field.path: got <value>, <what is allowed>` lines and reads YAML with a located error, so
`rayft validate`, `rayft serve` and `rayft merge` speak alike. It lives in storage/ because
both trainers/ and serve/ may import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from storage.errors import RayftError


class ConfigError(RayftError):
    """A config with one or more problems; `problems` lists each as one line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_path(loc: Iterable[Any]) -> str:
    """pydantic's error location as `a.b[2].c`, without the type names it adds for unions."""
    parts = []
    for item in loc:
        if isinstance(item, str) and (item.startswith(("literal[", "list[", "function-")) or item in ("str", "int", "bool")):
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts).replace(".[", "[") or "<top level>"


def raw_get(d: Any, *path: str) -> Any:
    """`d[path[0]][path[1]]...` of a raw (unvalidated) mapping, or None where a level is missing or not a mapping.

    Cross-field rules run on the raw mapping so that they report together with pydantic's own errors.
    """
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _allowed(err: dict, unknown_field_hint: str) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx['le']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "union_tag_invalid":
        return f"must be one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"missing `{ctx.get('discriminator', 'name').strip(chr(39))}`, which selects the kind"
    if kind == "extra_forbidden":
        return f"unknown field; {unknown_field_hint}"
    if kind == "missing":
        return "required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    # lower-case a sentence start, not an acronym ("Input should" -> "input should"; "AWS ..." stays)
    return msg[0].lower() + msg[1:] if len(msg) > 1 and msg[1].islower() else msg


def validation_problems(errors: Iterable[dict], unknown_field_hint: str = "check the spelling") -> list[str]:
    """One line per distinct pydantic error: `field.path: got <value>, <what is allowed>`."""
    problems: list[str] = []
    for err in errors:
        loc = field_path(err["loc"])
        if err["type"] == "union_tag_invalid":
            loc, err = f"{loc}.name", {**err, "input": err["ctx"].get("tag")}
        if err["type"] == "missing":
            line = f"{loc}: {_allowed(err, unknown_field_hint)}"
        else:
            line = f"{loc}: got {short(err.get('input'))}, {_allowed(err, unknown_field_hint)}"
        if line not in problems:
            problems.append(line)
    return problems


def read_yaml(path: str | Path, error: type[ConfigError], what: str) -> Any:
    """The parsed YAML file; `error(path, [one line])` when it is missing or not YAML. `what` names the file kind."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(str(path), [f"file not found; pass the path of {what}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise error(str(path), [f"not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None
