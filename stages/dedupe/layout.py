"""Where the dedupe stage keeps things, and how documents are numbered.

Every good document gets a ``uid``: ``shard << 36 | row``, where ``shard`` is the input file's index in
the sorted input list and ``row`` its ordinal among that file's good documents. Sorting by uid is the
stable document order ("first occurrence" means smallest uid), and ``row`` indexes the shard's
signature file directly.

Outputs (the cross-stage contract): ``data/part-NNNNN.parquet``, ``duplicates.parquet``,
``rejects/NNNNN.jsonl``, ``stats.json``. Intermediate files live under ``work/``; each per-shard step
writes its files first and its marker (a small JSON of per-shard stats) last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import storage

SHARD_SHIFT = 36
ROW_MASK = (1 << SHARD_SHIFT) - 1


def make_uids(shard: int, start: int, count: int) -> np.ndarray:
    return (np.int64(shard) << np.int64(SHARD_SHIFT)) + np.arange(start, start + count, dtype=np.int64)


def uid_shard(uids: np.ndarray) -> np.ndarray:
    return uids >> np.int64(SHARD_SHIFT)


def uid_row(uids: np.ndarray) -> np.ndarray:
    return uids & np.int64(ROW_MASK)


@dataclass(frozen=True)
class Layout:
    """Paths inside the stage directory ``out``."""

    out: str

    def p(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    # work/: per-shard intermediates and markers
    def docs(self, shard: int) -> str:
        return self.p("work", "docs", f"{shard:05d}.arrow")

    def ids(self, shard: int) -> str:
        return self.p("work", "ids", f"{shard:05d}.arrow")

    def sigs(self, shard: int) -> str:
        return self.p("work", "sigs", f"{shard:05d}.u32")

    def bands(self, shard: int) -> str:
        return self.p("work", "bands", f"{shard:05d}.parquet")

    def map_done(self, shard: int) -> str:
        return self.p("work", "map", f"{shard:05d}.json")

    def dups(self, shard: int) -> str:
        return self.p("work", "dups", f"{shard:05d}.parquet")

    def filter_done(self, shard: int) -> str:
        return self.p("work", "filter", f"{shard:05d}.json")

    @property
    def plan(self) -> str:
        return self.p("work", "plan.json")

    @property
    def removed(self) -> str:
        return self.p("work", "removed.parquet")

    @property
    def clusters_done(self) -> str:
        return self.p("work", "clusters.json")

    # outputs
    def part(self, shard: int) -> str:
        return self.p("data", f"part-{shard:05d}.parquet")

    def rejects(self, shard: int) -> str:
        return self.p("rejects", f"{shard:05d}.jsonl")

    @property
    def duplicates(self) -> str:
        return self.p("duplicates.parquet")

    @property
    def stats(self) -> str:
        return self.p("stats.json")
