"""Per-shard work: read and sign one input file (map), and filter its kept documents (output).

Both steps write their files atomically and their marker (``work/map/NNNNN.json`` or
``work/filter/NNNNN.json``, holding the shard's stats) last, so a killed run redoes only unmarked
shards and produces the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from stages.common.records import InputFile, Record, RecordReader, Reject
from stages.dedupe.buckets import band_rows
from stages.dedupe.config import DedupeConfig
from stages.dedupe.layout import SHARD_SHIFT, Layout, make_uids
from stages.dedupe.minhash import Signer
from stages.dedupe.tables import docs_table, read_arrow, read_parquet, write_arrow, write_parquet


def _text_bytes(table: pa.Table) -> int:
    """UTF-8 bytes of the ``text`` column."""
    return int(pc.sum(pc.binary_length(table["text"])).as_py() or 0)


def _batches(reader: RecordReader, size: int):
    batch: list[Record] = []
    for rec in reader:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def map_shard(cfg: DedupeConfig, shard: InputFile, out: str) -> dict[str, Any]:
    """Read ``shard``, quarantine bad records, sign good ones; write docs, signatures, band rows."""
    lay = Layout(out)
    bands, rows = cfg.lsh_params()
    signer = Signer(cfg.num_perm, cfg.seed, cfg.ngram)
    rejects: list[Reject] = []
    reader = RecordReader(shard.path, cfg.text_field, cfg.id_field, shard.rel, on_reject=rejects.append)
    ids: list[str] = []
    texts: list[str] = []
    objs: list[dict[str, Any]] = []
    shuffle: list[dict[str, np.ndarray]] = []
    with storage.open_atomic(lay.sigs(shard.index), "wb") as fsig:
        for batch in _batches(reader, cfg.batch_docs):
            btexts = [r.text for r in batch]
            signed = signer.sign(btexts)
            uids = make_uids(shard.index, len(ids), len(batch))
            fsig.write(signed.sigs.tobytes())
            shuffle.append(band_rows(uids, signed.sigs, signed.exact, bands, rows, cfg.near, cfg.exact))
            ids.extend(r.id for r in batch)
            texts.extend(btexts)
            objs.extend(r.fields for r in batch)
    n = len(ids)
    docs = docs_table(make_uids(shard.index, 0, n), ids, texts, objs, cfg.text_field, cfg.id_field)
    write_arrow(docs, lay.docs(shard.index))
    write_arrow(docs.select(["id"]), lay.ids(shard.index))  # small: id lookups need not read texts
    cols = {k: np.concatenate([s[k] for s in shuffle]) if shuffle else np.empty(0, t)
            for k, t in (("band", np.int16), ("key", np.uint64), ("key2", np.uint64), ("uid", np.int64))}
    write_parquet(pa.table(cols), lay.bands(shard.index), 1 << 20)
    if rejects:
        lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects)
        storage.write_text(lay.rejects(shard.index), lines)
    stats = {
        "shard": shard.index, "file": shard.path, "docs_in": reader.lines, "docs_rejected": len(rejects),
        "docs_good": n, "bytes_in": storage.size(shard.path), "text_bytes_in": _text_bytes(docs),
        "reject_reasons": _reason_counts(rejects),
    }
    storage.write_json(lay.map_done(shard.index), stats)
    return stats


def _reason_counts(rejects: list[Reject]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        key = r.reason.split(":", 1)[0].split(";", 1)[0]
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def filter_shard(cfg: DedupeConfig, shard: int, out: str) -> dict[str, Any]:
    """Write the shard's kept documents (``data/part-NNNNN.parquet``) and its duplicate rows."""
    lay = Layout(out)
    docs = read_arrow(lay.docs(shard))
    lo, hi = shard << SHARD_SHIFT, (shard + 1) << SHARD_SHIFT
    removed = read_parquet(lay.removed, filters=[("uid", ">=", lo), ("uid", "<", hi)])
    is_dup = pc.is_in(docs["uid"], value_set=removed["uid"])
    kept = docs.filter(pc.invert(is_dup)).drop_columns(["uid"])
    write_parquet(kept, lay.part(shard), cfg.row_group_rows)
    # ``removed`` is sorted by uid, like ``docs``, so the filtered rows line up.
    dup_ids = docs.filter(is_dup).column("id")
    dups = pa.table({"id": dup_ids, "cluster_id": removed["cluster_id"], "kept_id": removed["kept_id"],
                     "kind": removed["kind"]})
    write_parquet(dups, lay.dups(shard), cfg.row_group_rows)
    kinds = removed["kind"].to_pylist()
    stats = {
        "shard": shard, "docs_out": kept.num_rows, "exact_duplicates": kinds.count("exact"),
        "near_duplicates": kinds.count("near"), "bytes_out": storage.size(lay.part(shard)),
        "text_bytes_out": _text_bytes(kept),
    }
    storage.write_json(lay.filter_done(shard), stats)
    return stats
