"""Uploaded training files: validated JSONL in rayft storage, one folder per tenant.

Layout under the serve spec's storage URI: `service/files/<tenant>/<file-id>.jsonl` (the
content) and `<file-id>.json` (its OpenAI file object). Ids are checked against `FILE_ID`
before any storage call, and keys are built only from a checked id and a tenant name from
the spec, so no request reaches a path outside the files store.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import NotFound, RayftError
from storage.store import Store
from trainers.data import scan_rows
from trainers.preference_data import check_row as check_preference_row

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
PURPOSE = "fine-tune"
#: Problems listed in an upload's error; the rest are counted.
MAX_PROBLEMS_SHOWN = 10
_PREFIX = "service/files"
#: The format of a file of preference pairs, which `method: {"type": "dpo"}` trains on.
PREFERENCE = "preference"
#: Fields that make a row a preference pair: rayft's own, or OpenAI's DPO shape.
_PREFERENCE_FIELDS = ("chosen", "rejected", "preferred_output", "non_preferred_output")


class FileRejected(RayftError):
    """An upload that is not usable fine-tuning data; the message lists the first problems with line numbers."""

    http_status = 400


class FileNotFound(NotFound):
    """No such file for this tenant (a malformed id, another tenant's, or a deleted one: the same answer)."""


class FileObject(BaseModel):
    """OpenAI's file object, plus what rayft learnt at upload (format, rows)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str = PURPOSE
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    format: str = Field(description="rayft: the row format found (text, prompt_completion, messages, or preference: pairs for DPO).")
    rows: int = Field(description="rayft: usable rows.")


def new_id(prefix: str) -> str:
    """`<prefix>-` + 24 hex digits: 11 of the creation time in ms (ids sort by age), 13 random."""
    return f"{prefix}-{int(time.time() * 1000):011x}{secrets.token_hex(7)[:13]}"


def check_file_content(data: bytes, filename: str) -> tuple[str, int, bytes]:
    """(format, rows, bytes to store) of an upload; FileRejected naming the first problems by line number.

    A file whose first row is a preference pair is one for DPO: OpenAI's rows
    (`{"input": {"messages"}, "preferred_output", "non_preferred_output"}`) are stored as rayft's
    `{"prompt", "chosen", "rejected"}` rows (what training reads); the other formats are stored as sent.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FileRejected(f"{filename}: line {line}: not UTF-8 text ({exc.reason} at byte {exc.start}); upload UTF-8 JSONL") from None
    if _first_row_is_a_pair(text):
        fmt, shape = PREFERENCE, '{"prompt", "chosen", "rejected"} or OpenAI\'s {"input", "preferred_output", "non_preferred_output"}'
        problems, stored = [], []
        for line_no, row, problem in _scan_preference_rows(text):
            if problem is None:
                stored.append(json.dumps(row, ensure_ascii=False))
            else:
                problems.append(f"line {line_no}: {problem}")
        rows, data = len(stored), "".join(line + "\n" for line in stored).encode()
    else:
        shape = '{"messages": [...]}, {"prompt", "completion"} or {"text"} (or preference pairs for DPO)'
        problems, rows, fmt = [], 0, None
        for line_no, row, fmt, problem in scan_rows(text, "auto"):
            if problem is None:
                rows += 1
            else:
                problems.append(f"line {line_no}: {problem}")
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise FileRejected(
            f"{filename} is not valid fine-tuning data: {len(problems)} bad row(s): {shown}{more}. Every line must be one "
            f"JSON object of one format: {shape}"
        )
    if rows == 0:
        raise FileRejected(f"{filename} has no rows: a JSONL file needs one JSON object per line")
    return fmt, rows, data


def _first_row_is_a_pair(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(row, dict) and any(f in row for f in _PREFERENCE_FIELDS)
    return False


def _scan_preference_rows(text: str):
    """(line number, row in rayft's paired shape or None, problem or None) for every non-blank line."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        row, problem = _from_openai_pair(row)
        problem = problem or check_preference_row(row, "paired")
        yield line_no, (row if problem is None else None), problem


def _from_openai_pair(row: Any) -> tuple[Any, str | None]:
    """OpenAI's DPO row as rayft's {prompt, chosen, rejected} (message lists); other rows unchanged."""
    if not isinstance(row, dict) or not ({"preferred_output", "non_preferred_output", "input"} & row.keys()):
        return row, None
    extra = sorted(row.keys() - {"input", "preferred_output", "non_preferred_output"})
    if extra:
        return row, f"unexpected field(s) {', '.join(extra)} in an OpenAI preference row"
    messages = row.get("input", {}).get("messages") if isinstance(row.get("input"), dict) else None
    if not isinstance(messages, list):
        return row, '"input" must be {"messages": [...]}: the conversation before the two answers'
    return {"prompt": messages, "chosen": row.get("preferred_output"), "rejected": row.get("non_preferred_output")}, None


class FileStore:
    """Files of every tenant in one store; every method takes the caller's tenant."""

    def __init__(self, store: Store):
        self.store = store

    @staticmethod
    def _key(tenant: str, file_id: str, ext: str) -> str:
        if not FILE_ID.fullmatch(file_id):
            raise FileNotFound(f"no file {file_id!r}")
        return f"{_PREFIX}/{tenant}/{file_id}.{ext}"

    def add(self, tenant: str, filename: str, data: bytes) -> FileObject:
        """Validate and store an upload; the object is written last, so a file exists once it is complete."""
        fmt, rows, stored = check_file_content(data, filename)
        obj = FileObject(id=new_id("file"), bytes=len(data), created_at=int(time.time()), filename=filename, format=fmt, rows=rows)
        self.store.put_bytes(stored, self._key(tenant, obj.id, "jsonl"))
        self.store.put_bytes(obj.model_dump_json().encode(), self._key(tenant, obj.id, "json"))
        return obj

    def get(self, tenant: str, file_id: str) -> FileObject:
        key = self._key(tenant, file_id, "json")
        try:
            return FileObject.model_validate_json(self.store.get_bytes(key))
        except NotFound:
            raise FileNotFound(f"no file {file_id!r}") from None

    def content(self, tenant: str, file_id: str) -> bytes:
        self.get(tenant, file_id)
        return self.store.get_bytes(self._key(tenant, file_id, "jsonl"))

    def list(self, tenant: str) -> list[FileObject]:
        """This tenant's files, newest first."""
        ids = sorted((key.rsplit("/", 1)[1][: -len(".json")] for key in self.store.list(f"{_PREFIX}/{tenant}/")
                      if key.endswith(".json")), reverse=True)
        out = []
        for file_id in ids:
            try:
                out.append(self.get(tenant, file_id))
            except FileNotFound:  # deleted meanwhile
                continue
        return out

    def delete(self, tenant: str, file_id: str) -> None:
        self.get(tenant, file_id)
        self.store.delete(self._key(tenant, file_id, "json"))  # the object first: the file stops existing at once
        self.store.delete(self._key(tenant, file_id, "jsonl"))

    def data_uri(self, tenant: str, file_id: str) -> str:
        """Where a training job reads the file: s3://... or a local path."""
        uri = self.store.uri_for(self._key(tenant, file_id, "jsonl"))
        if uri.startswith("file://"):
            return unquote(urlparse(uri).path)
        return uri


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page over `items` (already in order): those after the id `after`, at most `limit`."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    chosen = items[start : start + limit]
    return {
        "object": "list", "data": chosen, "has_more": start + limit < len(items),
        "first_id": chosen[0]["id"] if chosen else None, "last_id": chosen[-1]["id"] if chosen else None,
    }

