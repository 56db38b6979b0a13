"""What a preprocessed dataset is (`Prepared`: where it lives, what it holds; JSON-able, passed to every worker) and
the block size its pass reads sources in. Below trainers.ingest.prepare (which makes it), trainers.ingest.stream
and trainers.ingest.live (which read it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Rows per block read from a source file (Ray Data then merges a read task's blocks up to its target block size).
BLOCK_ROWS = 4096


@dataclass
class Prepared:
    """Where a preprocessed dataset lives and what is in it; JSON-able, passed to every worker."""

    uri: str  # the cache directory (local path or s3://...)
    key: str
    train_files: list[str]  # filesystem paths of the train Parquet files, in data order
    eval_files: list[str]
    n_train: int
    n_eval: int
    stats: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    #: The rows' kind, as the objective reads them: "text" (SFT), "paired" or "unpaired" (preference rows)
    kind: str = "text"
    #: The example columns in the Parquet files (besides `_src`/`_row`, each example's source file and row)
    columns: list[str] = field(default_factory=lambda: ["input_ids", "labels"])
    #: Evaluate on the first this many eval examples only (`data.max_eval_rows`: set per job, not stored in the cache)
    eval_limit: int | None = None
    #: Preprocessed while the job trains (`data.preprocess: during`): the workers read the files in the order of the
    #: manifest that trainers.ingest.live keeps; while the pass runs, the files and counts are there, not here
    live: bool = False

    @property
    def n_evaluated(self) -> int:
        """The eval examples a job evaluates: the first `eval_limit` of the `n_eval` held out."""
        return self.n_eval if self.eval_limit is None else min(self.n_eval, self.eval_limit)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "Prepared":
        return cls(**raw)
