"""Per-shard work of the filter stage: one input file in, its kept and removed documents out.

Writes ``data/part-NNNNN.parquet`` (kept documents: ``id``, ``text``, the input's other fields, and
``language``/``language_score`` with language id), ``removed/part-NNNNN.parquet`` (the same columns plus
``rule``, ``value`` and ``detail``), ``rejects/NNNNN.jsonl`` (malformed records with a reason), and last
the marker ``work/shards/NNNNN.json`` holding the shard's stats; a killed run redoes only unmarked shards.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from stages.common.records import InputFile, RecordReader, Reject
from stages.dedupe.tables import docs_table, write_parquet
from stages.filter.apply import Filter, Outcome
from stages.filter.config import FilterConfig
from stages.filter.decontam import Index

SAMPLE_CHARS = 1000


def shard_name(i: int) -> str:
    return f"{i:05d}"


def marker(out: str, i: int) -> str:
    return storage.join(out, "work", "shards", f"{shard_name(i)}.json")


def _table(rows: list[tuple[Any, Outcome]], cfg: FilterConfig, text_field: str, id_field: str | None,
           removed: bool) -> pa.Table:
    recs = [r for r, _ in rows]
    texts = [o.text if not removed else r.text for r, o in rows]
    table = docs_table(np.arange(len(rows)), [r.id for r in recs], texts, [r.fields for r in recs],
                       text_field, id_field).drop_columns(["uid"])
    if cfg.language is not None:
        table = table.append_column("language", pa.array([o.columns.get("language") for _, o in rows],
                                                          pa.string()))
        table = table.append_column("language_score", pa.array(
            [o.columns.get("language_score") for _, o in rows], pa.float64()))
    if removed:
        table = table.append_column("rule", pa.array([o.rule for _, o in rows], pa.string()))
        table = table.append_column("value", pa.array([o.value for _, o in rows], pa.float64()))
        table = table.append_column("detail", pa.array([o.detail for _, o in rows], pa.string()))
    return table


def filter_shard(cfg: FilterConfig, shard: InputFile, out: str, text_field: str, id_field: str | None,
                 index_paths: tuple[str, str] | None) -> dict[str, Any]:
    """Filter one input file; returns (and writes as its marker) the shard's stats."""
    index = Index.load(*index_paths) if index_paths else None
    rules = Filter(cfg, index)
    rejects: list[Reject] = []
    reader = RecordReader(shard.path, text_field, id_field, shard.rel, on_reject=rejects.append)
    kept: list[tuple[Any, Outcome]] = []
    gone: list[tuple[Any, Outcome]] = []
    removed: dict[str, dict[str, int]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    langs: Counter[str] = Counter()
    decon: Counter[str] = Counter()
    stats = Counter()
    by_source: dict[str, dict[str, Any]] = {}
    for rec in reader:
        o = rules(rec.text, rec.fields)
        nbytes = len(rec.text.encode("utf-8"))
        stats["text_bytes_in"] += nbytes
        src = _source_counts(by_source, rec.fields.get(cfg.source_field), nbytes)
        stats["c4_lines_dropped"] += o.c4_lines_dropped
        if "language" in o.columns:
            langs[o.columns["language"]] += 1
        if o.rule is None:
            kept.append((rec, o))
            stats["text_bytes_out"] += len(o.text.encode("utf-8"))
            stats["pii_emails"] += o.emails
            stats["pii_ips"] += o.ips
            stats["pii_docs"] += bool(o.emails or o.ips)
            src["docs_out"] += 1
            src["text_bytes_out"] += len(o.text.encode("utf-8"))
            continue
        src["removed"][o.rule] = src["removed"].get(o.rule, 0) + 1
        gone.append((rec, o))
        r = removed.setdefault(o.rule, {"docs": 0, "text_bytes": 0})
        r["docs"] += 1
        r["text_bytes"] += nbytes
        if o.rule == "decontaminate":
            decon[o.detail.split(": ", 1)[0]] += 1
        bucket = samples.setdefault(o.rule, [])
        if len(bucket) < cfg.sample_per_rule:
            bucket.append({"id": rec.id, "value": o.value, "detail": o.detail,
                           "text": rec.text[:SAMPLE_CHARS]})
    write_parquet(_table(kept, cfg, text_field, id_field, False),
                  storage.join(out, "data", f"part-{shard_name(shard.index)}.parquet"), cfg.row_group_rows)
    write_parquet(_table(gone, cfg, text_field, id_field, True),
                  storage.join(out, "removed", f"part-{shard_name(shard.index)}.parquet"), cfg.row_group_rows)
    if rejects:
        lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects)
        storage.write_text(storage.join(out, "rejects", f"{shard_name(shard.index)}.jsonl"), lines)
    result = {
        "shard": shard.index, "file": shard.path, "docs_in": reader.lines, "docs_rejected": len(rejects),
        "docs_good": reader.good, "docs_out": len(kept), "docs_removed": len(gone),
        **{k: int(stats[k]) for k in ("text_bytes_in", "text_bytes_out", "c4_lines_dropped", "pii_emails",
                                      "pii_ips", "pii_docs")},
        "removed": dict(sorted(removed.items())), "languages": dict(sorted(langs.items())),
        "decontaminated": dict(sorted(decon.items())), "reject_reasons": _reasons(rejects),
        "by_source": dict(sorted(by_source.items())), "samples": samples,
    }
    storage.write_json(marker(out, shard.index), result)
    return result


def _reasons(rejects: list[Reject]) -> dict[str, int]:
    out: Counter[str] = Counter(r.reason.split(":", 1)[0].split(";", 1)[0] for r in rejects)
    return dict(sorted(out.items()))


def _source_counts(by_source: dict[str, dict[str, Any]], source: Any, nbytes: int) -> dict[str, Any]:
    """The counters of one document's source (documents without one count as ""), its input counted."""
    key = "" if source is None else str(source)
    c = by_source.setdefault(key, {"docs_in": 0, "text_bytes_in": 0, "docs_out": 0, "text_bytes_out": 0,
                                   "removed": {}})
    c["docs_in"] += 1
    c["text_bytes_in"] += nbytes
    return c
