"""The stage's last step: ``duplicates.parquet``, ``stats.json``, and what goes to MLflow."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from stages.dedupe.clusters import lookup_ids
from stages.dedupe.layout import Layout, uid_row, uid_shard
from stages.dedupe.tables import read_arrow

SUM_KEYS = ("docs_in", "docs_rejected", "docs_good", "bytes_in", "text_bytes_in", "docs_out",
            "exact_duplicates", "near_duplicates", "bytes_out", "text_bytes_out")
DUP_SCHEMA = pa.schema([("id", pa.string()), ("cluster_id", pa.string()), ("kept_id", pa.string()),
                        ("kind", pa.string())])


def write_duplicates(out: str, shards: list[int], row_group_rows: int) -> None:
    """Concatenate the per-shard duplicate rows, in shard order, into ``duplicates.parquet``."""
    lay = Layout(out)
    with storage.open_atomic(lay.duplicates, "wb") as f, \
            pq.ParquetWriter(f, DUP_SCHEMA, compression="snappy") as writer:
        for shard in shards:
            with storage.open_read(lay.dups(shard), "rb") as src:
                table = pq.read_table(src).cast(DUP_SCHEMA)
            if table.num_rows:
                writer.write_table(table, row_group_size=row_group_rows)


DATA_COLUMNS = {
    "id": "the document's id: the input's id_field, else its own `id` field, else <file>:<line>",
    "text": "the document's text, unchanged (the input's text_field)",
}
DUP_COLUMNS = {
    "id": "id of a removed document",
    "cluster_id": "id of its duplicate cluster: the id of the cluster's first document (input order)",
    "kept_id": "id of the document kept in its place (in data/)",
    "kind": "exact (same normalised text) or near (MinHash Jaccard >= threshold)",
}
REJECT_FIELDS = {"file": "input file", "line": "line (or Parquet row) number, from 1",
                 "reason": "why the record was refused", "snippet": "its first characters"}


def build_manifest(out: str, config: Any) -> dict[str, Any]:
    """``manifest.json``: what each output file holds, its columns described, row counts per part."""
    lay = Layout(out)
    parts = []
    schema = None
    for path in storage.glob(storage.join(out, "data", "part-*.parquet")):
        with storage.open_read(path, "rb") as f:
            meta = pq.read_metadata(f)
        schema = schema or meta.schema.to_arrow_schema()
        parts.append({"path": path[len(out.rstrip("/")) + 1:], "rows": meta.num_rows,
                      "bytes": storage.size(path)})
    columns = {}
    for fld in schema or []:
        what = DATA_COLUMNS.get(fld.name, "passed through from the input records (a field named uid, id or "
                                          "text is kept as input_<name>)")
        columns[fld.name] = {"type": str(fld.type), "description": what}
    return {
        "format": "seedline-documents-v1",
        "documents": {"path": "data/part-*.parquet", "rows": sum(p["rows"] for p in parts),
                      "columns": columns, "parts": parts},
        "duplicates": {"path": lay.duplicates[len(out.rstrip("/")) + 1:],
                       "columns": {k: {"type": str(DUP_SCHEMA.field(k).type), "description": v}
                                   for k, v in DUP_COLUMNS.items()}},
        "rejects": {"path": "rejects/*.jsonl", "fields": REJECT_FIELDS},
        "stats": "stats.json: counts (docs and bytes in/out, rejects by reason, duplicates, clusters)",
        "input": config.input, "text_field": config.text_field, "id_field": config.id_field,
    }


def merge_stats(map_stats: list[dict[str, Any]], filter_stats: list[dict[str, Any]],
                cluster_stats: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {k: 0 for k in SUM_KEYS}
    reasons: dict[str, int] = {}
    for s in [*map_stats, *filter_stats]:
        for k in SUM_KEYS:
            stats[k] += int(s.get(k, 0))
        for r, c in s.get("reject_reasons", {}).items():
            reasons[r] = reasons.get(r, 0) + c
    stats["reject_reasons"] = dict(sorted(reasons.items()))
    stats["shards"] = len(map_stats)
    stats.update(cluster_stats)
    return stats


def read_texts(out: str, uids: np.ndarray) -> list[str]:
    """Texts of a few documents (the staged shard files are memory-mapped when local)."""
    lay = Layout(out)
    return [read_arrow(lay.docs(int(uid_shard(np.int64(u)))), ["text"]).column("text")[
        int(uid_row(np.int64(u)))].as_py() for u in uids]


def sample_pairs(out: str, limit: int = 20, chars: int = 300) -> list[dict[str, Any]]:
    """The first ``limit`` removed documents (stable order) beside the documents kept in their place."""
    lay = Layout(out)
    with storage.open_read(lay.removed, "rb") as f:
        pf = pq.ParquetFile(f)
        head = pf.read_row_group(0) if pf.num_row_groups else None
    if head is None or head.num_rows == 0:
        return []
    head = head.slice(0, limit)
    dup_texts = read_texts(out, np.asarray(head["uid"]))
    kept_texts = read_texts(out, np.asarray(head["kept_uid"]))
    dup_ids = lookup_ids(out, np.asarray(head["uid"]))
    rows = head.to_pylist()
    return [{"id": i, "kind": r["kind"], "cluster_id": r["cluster_id"], "kept_id": r["kept_id"],
             "kept_text": k[:chars], "duplicate_text": d[:chars]}
            for r, i, d, k in zip(rows, dup_ids, dup_texts, kept_texts, strict=False)]
