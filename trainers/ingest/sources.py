"""Where training rows come from: local paths or s3:// URIs; files, directories and glob patterns;
JSONL, JSON, Parquet, CSV and Hugging Face `datasets` directories (`save_to_disk`, Arrow).

Every file is read the same way, as blocks of (`_src` file index, `_row` position, `_raw` row as JSON
bytes), so a bad row can always be named by file and line (JSONL, JSON lines, CSV) or row index
(Parquet, Arrow, a JSON array). The same reader serves the driver's quick look at the first rows
(`preview`) and the Ray Data datasource that reads everything (`RowSource`).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Iterator

from storage.errors import RayftError
from storage.store import pyarrow_filesystem

#: File kinds by extension.
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
GLOB_CHARS = "*?["


class DataError(RayftError):
    """Data that cannot be used: unreadable, empty, of the wrong type, or with a malformed row."""


@dataclass(frozen=True)
class SourceFile:
    uri: str  # as shown to the user (s3://... or a local path)
    path: str  # path on the filesystem
    kind: str  # jsonl | json | parquet | csv | arrow
    size: int
    mtime: float | None

    def where(self, row: int) -> str:
        """`file:line` for line-based rows, `file: row N` for positional ones (see `index_row`)."""
        return f"{self.uri}:{row}" if row > 0 else f"{self.uri}: row {-row - 1}"


def index_row(i: int) -> int:
    """`_row` holds a 1-based line number (> 0) or, for Parquet/Arrow/JSON arrays, -(0-based index + 1)."""
    return -i - 1


def filesystem_for(uri: str):
    """(pyarrow filesystem, path) for a local path or an s3:// URI, with rayft's S3 configuration."""
    if uri.startswith("s3://"):
        bucket, _, rest = uri[5:].partition("/")
        fs, root = pyarrow_filesystem(f"s3://{bucket}")
        return fs, f"{root}/{rest}".rstrip("/")
    import os

    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str, field: str = "data.train"):
    """(filesystem, [SourceFile]) for a file, a directory, a glob pattern, or a `datasets` directory."""
    import pyarrow.fs

    try:
        fs, path = filesystem_for(uri)
    except RayftError as exc:
        raise DataError(f"{field}: cannot open {uri}: {exc}") from None
    File, Dir = pyarrow.fs.FileType.File, pyarrow.fs.FileType.Directory
    try:
        if any(c in path for c in GLOB_CHARS):
            parts = path.split("/")
            base_n = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
            base = "/".join(parts[:base_n]) or "/"
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
            matched = sorted(i.path for i in infos if i.type == File and fnmatch.fnmatchcase(i.path, path))
            files = [_source(fs, uri, p, field) for p in matched if _kind(p)]
            if not files:
                raise DataError(f"{field}: no {'/'.join(sorted(set(EXTENSIONS)))} files match {uri}")
            return fs, files
        info = fs.get_file_info(path)
        if info.type == File:
            return fs, [_source(fs, uri, path, field)]
        if info.type == Dir:
            return fs, _directory(fs, uri, path, field)
    except OSError as exc:
        raise DataError(f"{field}: cannot read {uri}: {exc}") from None
    raise DataError(f"{field}: {uri} does not exist; give a file, a directory or a glob pattern (local or s3://)")


def _kind(path: str) -> str | None:
    for ext, kind in EXTENSIONS.items():
        if path.lower().endswith(ext):
            return kind
    return None


def _source(fs, uri: str, path: str, field: str, kind: str | None = None) -> SourceFile:
    kind = kind or _kind(path)
    if kind is None:
        raise DataError(f"{field}: {uri}: unsupported file type; use .jsonl, .json, .parquet, .csv, "
                        "or a Hugging Face datasets directory (save_to_disk)")
    info = fs.get_file_info(path)
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    return SourceFile(uri=f"s3://{path}" if uri.startswith("s3://") else path, path=path, kind=kind,
                      size=info.size or 0, mtime=mtime)


def _directory(fs, uri: str, path: str, field: str) -> list[SourceFile]:
    """Every supported file under `path`, sorted; a `datasets` directory inside (or `path` itself) counts as its
    Arrow shards in their own order, and its metadata files are not data."""
    import pyarrow.fs

    infos = [i for i in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)) if i.type == pyarrow.fs.FileType.File]
    by_dir: dict[str, set[str]] = {}
    for i in infos:
        parent, _, name = i.path.rpartition("/")
        by_dir.setdefault(parent, set()).add(name)
    if "dataset_dict.json" in by_dir.get(path, set()):
        raise DataError(f"{field}: {uri} is a DatasetDict with several splits; point {field} at one split's "
                        "directory (e.g. .../train)")
    hf_dirs = sorted(d for d, names in by_dir.items() if "state.json" in names and "dataset_info.json" in names)
    out: list[tuple[str, SourceFile]] = []
    for d in hf_dirs:
        arrows = _hf_arrow_files(fs, d)
        if not arrows:
            raise DataError(f"{field}: {d} looks like a datasets directory but has no .arrow files")
        out += [(d, _source(fs, uri, p, field, kind="arrow")) for p in arrows]
    inside_hf = lambda p: any(p.startswith(d + "/") for d in hf_dirs)
    out += [(i.path, _source(fs, uri, i.path, field)) for i in infos if _kind(i.path) and not inside_hf(i.path)]
    if not out:
        raise DataError(f"{field}: {uri} holds no .jsonl, .json, .parquet or .csv files and no datasets directory")
    return [f for _, f in sorted(out, key=lambda x: x[0])]


def _hf_arrow_files(fs, path: str) -> list[str]:
    """The Arrow shards of a `save_to_disk` directory, in the order its state.json lists them."""
    import pyarrow.fs

    try:
        with fs.open_input_stream(f"{path}/state.json") as f:
            state = json.loads(f.read())
        return [f"{path}/{d['filename']}" for d in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError):
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
        return sorted(i.path for i in infos if i.path.endswith(".arrow"))


# --- reading -------------------------------------------------------------------------------------


def _block(src: int, rows: list[int], raws: list[bytes]):
    import pyarrow as pa

    return pa.table({
        "_src": pa.array([src] * len(rows), pa.int32()),
        "_row": pa.array(rows, pa.int64()),
        "_raw": pa.array(raws, pa.binary()),
    })


def _dumps(row: dict) -> bytes:
    return json.dumps(row, default=str, ensure_ascii=False).encode("utf-8")


def read_blocks(f, source: SourceFile, src: int, block_rows: int, limit: int | None = None) -> Iterator:
    """Blocks of (`_src`, `_row`, `_raw`) from the open file `f` (a seekable pyarrow file)."""
    try:
        yield from _read_blocks(f, source, src, block_rows, limit)
    except DataError:
        raise
    except Exception as exc:  # pyarrow's reader errors: the file is not what its extension says
        what = {"parquet": "a Parquet file", "arrow": "an Arrow (datasets) file", "csv": "a CSV file",
                "json": "a JSON file", "jsonl": "a JSONL file"}[source.kind]
        raise DataError(f"{source.uri}: not {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        "check the file and its extension") from None


def _read_blocks(f, source: SourceFile, src: int, block_rows: int, limit: int | None) -> Iterator:
    kind = source.kind
    if kind in ("jsonl", "json"):
        head = f.read(64 * 1024)
        if kind == "json" and head.lstrip()[:1] == b"[":
            data = json.loads(head + f.read())
            rows = [index_row(i) for i in range(len(data))][:limit]
            raws = [_dumps(r) if isinstance(r, dict) else json.dumps(r).encode() for r in data[: len(rows)]]
            for i in range(0, len(rows), block_rows):
                yield _block(src, rows[i:i + block_rows], raws[i:i + block_rows])
            return
        if head[:4] == b"PAR1" or head[:2] == b"\x1f\x8b":
            raise DataError(f"{source.uri}: binary data (a {'Parquet' if head[:4] == b'PAR1' else 'gzip'} file?), "
                            f"not {'JSON lines' if kind == 'jsonl' else 'JSON'}; check the file and its extension")
        yield from _read_lines(f, head, src, block_rows, limit)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        yield from _table_blocks(pf.iter_batches(batch_size=block_rows), src, limit, line_offset=None)
    elif kind == "arrow":
        import pyarrow as pa

        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            reader = pa.ipc.open_file(f)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _table_blocks(reader, src, limit, line_offset=None)
    elif kind == "csv":
        import pyarrow.csv as pcsv

        reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 20),
                               convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
        yield from _table_blocks(reader, src, limit, line_offset=2, block_rows=block_rows)


def _read_lines(f, head: bytes, src: int, block_rows: int, limit: int | None) -> Iterator:
    line_no, rows, raws, rest, emitted = 0, [], [], head, 0
    chunk = head
    while True:
        if not chunk:
            lines = [rest] if rest else []
            rest = b""
        else:
            lines = rest.split(b"\n")
            rest = lines.pop()
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            rows.append(line_no)
            raws.append(line)
            emitted += 1
            if limit is not None and emitted >= limit:
                yield _block(src, rows, raws)
                return
            if len(rows) >= block_rows:
                yield _block(src, rows, raws)
                rows, raws = [], []
        if not chunk:
            break
        chunk = f.read(4 * 1024 * 1024)
        rest += chunk
    if rows:
        yield _block(src, rows, raws)


def _table_blocks(batches, src: int, limit: int | None, line_offset: int | None, block_rows: int | None = None) -> Iterator:
    """Record batches → blocks; `_row` is a line number (CSV: index + line_offset) or an encoded row index."""
    start = 0
    for batch in batches:
        rows = batch.to_pylist()
        if block_rows:
            pieces = [rows[i:i + block_rows] for i in range(0, len(rows), block_rows)] or [[]]
        else:
            pieces = [rows]
        for piece in pieces:
            if limit is not None:
                piece = piece[: max(0, limit - start)]
            if not piece:
                if limit is not None and start >= limit:
                    return
                continue
            positions = [(start + i + line_offset) if line_offset else index_row(start + i) for i in range(len(piece))]
            yield _block(src, positions, [_dumps(r) for r in piece])
            start += len(piece)


def preview(fs, source: SourceFile, src: int, n: int = 20) -> list[tuple[int, bytes]]:
    """The first `n` rows of a file as (`_row`, raw JSON bytes), for format detection and up-front checks."""
    return list(read_rows(fs, source, src, limit=n, block_rows=n))


def read_rows(fs, source: SourceFile, src: int, limit: int | None = None, block_rows: int = 1024) -> Iterator[tuple[int, bytes]]:
    """A file's rows (at most `limit`) as (`_row`, raw JSON bytes), in one process (small data: the driver's look
    at the first rows, evaluation sets); training data is read by Ray Data (`make_row_source`)."""
    if limit is not None and limit <= 0:
        return
    try:
        with fs.open_input_file(source.path) as f:
            seen = 0
            for block in read_blocks(f, source, src, block_rows=block_rows, limit=limit):
                for row in zip(block.column("_row").to_pylist(), block.column("_raw").to_pylist()):
                    if limit is not None and seen >= limit:
                        return
                    seen += 1
                    yield row
    except OSError as exc:
        raise DataError(f"{source.uri}: cannot read: {exc}") from None


#: The CPU priority (nice) of a pass's tasks while the job trains (`data.preprocess: during`). At equal priority the
#: first step came later than the pass's first files; at nice 10 training ran at 1,259 tokens/s beside the pass, at 19
#: at 2,100 (data bench, 3.2M rows, 2 cores; about 5,000 alone).
BACKGROUND_NICE = 19


def lower_priority() -> None:
    """Run this process at a lower CPU priority (nice BACKGROUND_NICE): a pass that shares the CPUs with training
    takes what the training step and the workers' start leave them."""
    import os

    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)
    except OSError:  # not allowed here: the pass runs at the priority it has
        pass


def make_row_source(fs, files: list[SourceFile], block_rows: int, background: bool = False):
    """A Ray Data datasource that reads `files` as (`_src`, `_row`, `_raw`) blocks, files in the given order
    (`background`: at a lower CPU priority, see `lower_priority`)."""
    from ray.data.datasource import FileBasedDatasource

    index = {f.path: i for i, f in enumerate(files)}
    by_path = {f.path: f for f in files}

    class RowSource(FileBasedDatasource):
        def _open_input_source(self, filesystem, path, **open_args):
            return filesystem.open_input_file(path)  # seekable: Parquet needs random access

        def _read_stream(self, f, path: str):
            if background:
                lower_priority()
            yield from read_blocks(f, by_path[path], index[path], block_rows)

    return RowSource([f.path for f in files], filesystem=fs)


def read_prepared_files(batch, *, filesystem, columns: list[str]):
    """Ray Data operator: the preprocessed Parquet files named in `batch["path"]`, read whole (one source block each).
    Here, not in trainers.ingest.stream, so that the tasks running it never import torch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, filesystem=filesystem, columns=columns) for p in batch.column("path").to_pylist()])
