"""Pack step (a Ray task per output shard): cut a split's token stream into rows, write an Arrow shard.

A split's *stream* is its documents' tokens (each followed by end-of-text), input file after input file,
in file order. Row ``r`` holds stream tokens ``[r*L, r*L + L + 1)`` with ``L = seq_len``: consecutive rows
overlap by one token (Megatron-style), so ``input_ids = row[:-1]`` and ``labels = row[1:]`` make every
token after the first a training target exactly once per epoch. The last row of a split is padded with
the pad id (its ``length`` says how many tokens are real); nothing is carried over or dropped.

Shard file ``<split>/part-NNNNN.arrow`` (Arrow IPC file, uncompressed, one record batch, so a reader can
memory-map it and view the tokens as a ``(rows, L + 1)`` array without copying):

- ``tokens``: ``fixed_size_list<uint16|uint32>[L + 1]``
- ``length``: ``int32``, real (non-padding) tokens in the row
- ``doc_starts``: ``list<int32>``, the positions ``0 <= i < L`` where a document starts in the row (a
  document already running at position 0 is a continuation and is not listed)

Shard ``k`` holds rows ``[k*R, (k+1)*R)`` (``R = rows_per_shard``), so any row is found in O(1). Each
task writes its shard atomically, then its marker ``work/pack/<split>/NNNNN.json`` (rows, tokens, sha256).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import storage
from stages.tokenize.layout import Layout

FORMAT = "seedline-packed-v1"


def num_rows(stream_tokens: int, seq_len: int) -> int:
    """Rows needed so that every stream token after the first is a target once."""
    return 0 if stream_tokens < 2 else -(-(stream_tokens - 1) // seq_len)


def shard_schema(dtype: str, seq_len: int) -> pa.Schema:
    item = pa.field("item", pa.from_numpy_dtype(np.dtype(dtype)), nullable=False)
    return pa.schema(
        [pa.field("tokens", pa.list_(item, seq_len + 1), nullable=False),
         pa.field("length", pa.int32(), nullable=False),
         pa.field("doc_starts", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False)],
        metadata={"format": FORMAT, "seq_len": str(seq_len)},
    )


@dataclass(frozen=True)
class SplitPlan:
    """One split's stream: the encoded files (in input order) and their token counts."""

    split: str
    files: list[str]
    tokens: list[int]
    seq_len: int
    rows_per_shard: int
    dtype: str
    pad: int

    @property
    def stream_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def rows(self) -> int:
        return num_rows(self.stream_tokens, self.seq_len)

    @property
    def shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        r0 = shard * self.rows_per_shard
        return r0, min(self.rows, r0 + self.rows_per_shard)


def _open_ipc(path: str) -> ipc.RecordBatchFileReader:
    p = storage.local(path)
    source = pa.memory_map(str(p), "r") if p is not None else pa.py_buffer(storage.read_bytes(path))
    return ipc.open_file(source)


def read_range(plan: SplitPlan, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream tokens ``[a, b)`` and the stream positions in ``[a, b)`` where documents start."""
    tokens: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    file_start = 0
    for path, n in zip(plan.files, plan.tokens, strict=True):
        if file_start < b and file_start + n > a:
            reader = _open_ipc(path)
            g = file_start
            for i in range(reader.num_record_batches):
                ids = reader.get_batch(i).column(0)
                offsets = ids.offsets.to_numpy()
                m = int(offsets[-1] - offsets[0])
                if g < b and g + m > a:
                    values = ids.values.to_numpy()[offsets[0]: offsets[-1]]
                    tokens.append(values[max(a - g, 0): min(b - g, m)])
                    doc = g + offsets[:-1] - offsets[0]
                    starts.append(doc[(doc >= a) & (doc < b)])
                g += m
                if g >= b:
                    break
        file_start += n
        if file_start >= b:
            break
    dtype = np.dtype(plan.dtype)
    flat = np.concatenate(tokens) if tokens else np.empty(0, dtype)
    return flat.astype(dtype, copy=False), np.concatenate(starts) if starts else np.empty(0, np.int64)


def build_rows(plan: SplitPlan, shard: int) -> pa.RecordBatch:
    """The shard's rows as one record batch (see the module docstring for the columns)."""
    L = plan.seq_len
    r0, r1 = plan.shard_rows(shard)
    n_rows = r1 - r0
    a = r0 * L
    need = n_rows * L + 1
    b = min(plan.stream_tokens, a + need)
    stream, starts = read_range(plan, a, b)
    buf = np.full(need, plan.pad, np.dtype(plan.dtype))
    buf[: len(stream)] = stream
    item = buf.itemsize
    rows = np.lib.stride_tricks.as_strided(buf, shape=(n_rows, L + 1), strides=(L * item, item)).copy()
    length = np.minimum(L + 1, b - a - np.arange(n_rows, dtype=np.int64) * L).astype(np.int32)
    local = starts - a
    local = local[local < n_rows * L]
    row_of = local // L
    offsets = np.searchsorted(row_of, np.arange(n_rows + 1)).astype(np.int32)
    schema = shard_schema(plan.dtype, L)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), type=schema.field("tokens").type)
    doc_starts = pa.ListArray.from_arrays(pa.array(offsets), pa.array((local % L).astype(np.int32)),
                                          type=schema.field("doc_starts").type)
    return pa.record_batch([tokens, pa.array(length), doc_starts], schema=schema)


def pack_shard(plan: SplitPlan, shard: int, out: str) -> dict[str, Any]:
    """Write shard ``shard`` of ``plan.split`` atomically, then its marker; returns the marker's content."""
    lay = Layout(out)
    batch = build_rows(plan, shard)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = sink.getvalue()
    storage.write_bytes(lay.part(plan.split, shard), data)
    stats = {
        "split": plan.split, "shard": shard, "path": lay.part_name(plan.split, shard),
        "rows": batch.num_rows, "tokens": int(np.asarray(batch.column(1)).sum()),
        "doc_starts": len(batch.column(2).values), "bytes": data.size,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    storage.write_json(lay.pack_done(plan.split, shard), stats)
    return stats
