"""Arrow tables of documents: ``id``, ``text`` and the input's other fields passed through."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from stages.common.records import DEFAULT_ID_FIELD

RESERVED = ("uid", "id", "text")


def passthrough_name(name: str) -> str:
    """Input fields named like an output column are kept as ``input_<name>``."""
    return f"input_{name}" if name in RESERVED else name


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # Mixed types in one field (e.g. a number in some records, a string in others): keep every value
        # losslessly as its JSON text rather than dropping the field.
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True)
                         for v in values], type=pa.string())


def docs_table(uids: Any, ids: list[str], texts: list[str], objs: list[dict[str, Any]],
               text_field: str, id_field: str | None) -> pa.Table:
    """One table for a shard's good documents; other fields in order of first appearance. The id field
    (the records' own ``id`` when no ``id_field`` is set) is the ``id`` column, not passed through."""
    skip = {text_field, id_field or DEFAULT_ID_FIELD}
    names: dict[str, None] = {}
    for o in objs:
        for k in o:
            if k not in skip and k not in names:
                names[k] = None
    cols: dict[str, pa.Array] = {
        "uid": pa.array(uids, type=pa.int64()),
        "id": pa.array(ids, type=pa.string()),
        "text": pa.array(texts, type=pa.string()),
    }
    for k in names:
        cols[passthrough_name(k)] = _column([o.get(k) for o in objs])
    return pa.table(cols)


def write_parquet(table: pa.Table, path: str, row_group_rows: int, dictionary: bool = False) -> None:
    """Atomic, deterministic Parquet write (same table, same bytes).

    Dictionary encoding is off by default: document texts and hash keys are nearly all distinct, and
    trying to dictionary-encode them costs more time than writing them.
    """
    with storage.open_atomic(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_rows, compression="snappy",
                       use_dictionary=dictionary)


def read_parquet(path: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    with storage.open_read(path, "rb") as f:
        return pq.read_table(f, columns=columns, filters=filters)


def write_arrow(table: pa.Table, path: str) -> None:
    """Atomic Arrow IPC file (uncompressed: intermediate files are read back once, memory-mapped)."""
    with storage.open_atomic(path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)


def read_arrow(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read an Arrow IPC file; memory-mapped when local."""
    p = storage.local(path)
    source = pa.memory_map(str(p)) if p is not None else pa.BufferReader(storage.read_bytes(path))
    table = pa.ipc.open_file(source).read_all()
    return table.select(columns) if columns is not None else table
