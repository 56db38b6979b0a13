"""Training data on Ray Data: sources and row formats in, tokenized and masked examples streamed to the workers.

- `sources`: files, directories, globs (local, s3://); JSONL/JSON/Parquet/CSV/`datasets` Arrow; a line-aware reader.
- `formats`: the row-format and encoder registries (pure functions: detect, check, template, tokenize, mask, pack).
- `prepare`: the driver-side Ray Data pass that preprocesses once into a reusable Parquet dataset, with stats.
- `stream`: the worker side: a seeded, resumable micro-batch stream over `ray.train.get_dataset_shard`.
"""

from trainers.ingest.formats import IGNORE
from trainers.ingest.sources import DataError

__all__ = ["IGNORE", "DataError"]
