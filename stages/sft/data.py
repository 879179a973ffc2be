"""Tokenized SFT examples on disk, and model batches from them.

``build_rows`` applies the length policy and groups examples into rows (one example per row, or
best-fit-decreasing packing). ``write_rows`` stores a split as one Arrow IPC file (deterministic bytes),
one record per row:

- ``tokens`` large_list<int32>: the examples' token ids, one after another;
- ``loss_mask`` large_list<uint8>: 1 where the token is trained on (assistant content and its ``<|im_end|>``);
- ``lengths`` large_list<int32>: the examples' lengths, in row order;
- ``ids`` list<string>: the examples' source ids (``<file>:<line>``).

``SFTDataset`` reads such a file and builds batches in the COMMON batch contract, so the shared
``stages.lm.data.Loader`` (seeded order per epoch, rank split, exact resume) drives it as-is:

- ``input_ids`` (B, T): the row's tokens, padded with the pad id to T = the longest row of the batch
  (rounded up to a multiple of 8, at most ``max_len``);
- ``labels`` (B, T), already aligned: ``labels[t] = tokens[t + 1]`` where token t + 1 is trained on and
  belongs to the same example, else -100 (so no target crosses an example boundary or hits padding);
- ``position_ids`` (B, T): restart at 0 at each example start (and for the padding);
- ``doc_mask`` (B, T), on request (packed rows): example number within the row, padding its own segment.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import storage
from stages.sft.pack import best_fit_decreasing

IGNORE_INDEX = -100
PAD_MULTIPLE = 8
SCHEMA = pa.schema([("tokens", pa.large_list(pa.int32())), ("loss_mask", pa.large_list(pa.uint8())),
                    ("lengths", pa.large_list(pa.int32())), ("ids", pa.list_(pa.string()))])


@dataclass
class Encoded:
    """One tokenized conversation."""

    id: str
    ids: np.ndarray  # (n,) int32
    mask: np.ndarray  # (n,) bool: trained on


@dataclass
class RowStats:
    """What the length policy and packing did to one split (summed into ``stats.json``)."""

    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_ids: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    def to_dict(self, max_len: int) -> dict[str, Any]:
        fill = self.tokens / (self.rows * max_len) if self.rows else 0.0
        return {"examples": self.examples, "truncated": self.truncated,
                "dropped_too_long": self.dropped_too_long, "dropped_no_target": self.dropped_no_target,
                "rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "row_fill": round(fill, 6)}


def apply_length_policy(examples: list[Encoded], max_len: int, truncation: str,
                        stats: RowStats) -> list[Encoded]:
    """Examples that fit ``max_len``: longer ones are cut (``truncate``) or left out (``drop``); an
    example with no trained token left after cutting is left out too. Both are counted in ``stats``."""
    kept = []
    for ex in examples:
        if len(ex.ids) > max_len:
            if truncation == "drop":
                stats.dropped_too_long += 1
                stats.dropped_ids.append((ex.id, f"{len(ex.ids)} tokens > max_len {max_len} (policy: drop)"))
                continue
            cut = Encoded(ex.id, ex.ids[:max_len], ex.mask[:max_len])
            if not cut.mask[1:].any():  # a token is trained on as a target, i.e. from position 1 on
                stats.dropped_no_target += 1
                stats.dropped_ids.append((ex.id, f"{len(ex.ids)} tokens > max_len {max_len} and no assistant "
                                                 "token in the first max_len (policy: truncate)"))
                continue
            stats.truncated += 1
            ex = cut
        kept.append(ex)
    return kept


def build_rows(examples: list[Encoded], max_len: int, packing: bool) -> list[list[int]]:
    """Rows of example indices: one each, or packed best-fit-decreasing into ``max_len`` tokens."""
    if not packing:
        return [[i] for i in range(len(examples))]
    return best_fit_decreasing([len(ex.ids) for ex in examples], max_len)


def _list(values: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values], dtype=np.int64)]).astype(np.int64)
    flat = np.concatenate(values) if values else np.empty(0, np.int32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def rows_table(examples: list[Encoded], rows: list[list[int]]) -> pa.RecordBatch:
    """The Arrow record batch of a split (see the module docstring)."""
    tokens = [np.concatenate([examples[i].ids for i in r]) for r in rows]
    masks = [np.concatenate([examples[i].mask for i in r]).astype(np.uint8) for r in rows]
    lengths = [np.array([len(examples[i].ids) for i in r], np.int32) for r in rows]
    ids = pa.array([[examples[i].id for i in r] for r in rows], type=pa.list_(pa.string()))
    return pa.record_batch([_list(tokens, pa.int32()), _list(masks, pa.uint8()),
                            _list(lengths, pa.int32()), ids], schema=SCHEMA)


def write_rows(path: str, batch: pa.RecordBatch) -> None:
    """Write a split atomically (local or URL)."""
    buf = io.BytesIO()
    with ipc.new_file(buf, SCHEMA) as w:
        w.write_batch(batch)
    storage.write_bytes(path, buf.getvalue())


def _flat(col: pa.LargeListArray) -> tuple[np.ndarray, np.ndarray]:
    offsets = col.offsets.to_numpy().astype(np.int64)
    return col.values.to_numpy(zero_copy_only=False), offsets


class SFTDataset:
    """One split written by ``write_rows``; ``batch(indices)`` gives model inputs (module docstring)."""

    def __init__(self, path: str, max_len: int, pad_id: int, split: str = "train"):
        reader = ipc.open_file(pa.BufferReader(storage.read_bytes(path)))
        table = reader.read_all().combine_chunks()
        self.split, self.max_len, self.pad_id = split, max_len, pad_id
        self.tokens, self.row_offsets = _flat(table.column("tokens").chunk(0))
        self.mask = _flat(table.column("loss_mask").chunk(0))[0].astype(bool)
        self.lengths, self.length_offsets = _flat(table.column("lengths").chunk(0))
        self._ids = table.column("ids")
        self._len = table.num_rows

    def __len__(self) -> int:
        return self._len

    def row_ids(self) -> list[list[str]]:
        """The source ids (``<file>:<line>``) of the examples in each row."""
        return self._ids.to_pylist()

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, loss mask, example lengths) of row ``index``."""
        a, b = self.row_offsets[index], self.row_offsets[index + 1]
        la, lb = self.length_offsets[index], self.length_offsets[index + 1]
        return self.tokens[a:b], self.mask[a:b], self.lengths[la:lb]

    def batch(self, indices: np.ndarray | list[int], doc_mask: bool = False) -> dict[str, Any]:
        """Model inputs for the given rows (see the module docstring)."""
        import torch

        rows = [self.row(int(i)) for i in indices]
        longest = max((len(t) for t, _, _ in rows), default=1)
        T = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(self.max_len, longest))
        n = len(rows)
        input_ids = np.full((n, T), self.pad_id, np.int64)
        labels = np.full((n, T), IGNORE_INDEX, np.int64)
        positions = np.zeros((n, T), np.int64)
        segments = np.zeros((n, T), np.int64)
        for j, (tok, mask, lengths) in enumerate(rows):
            L = len(tok)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            seg = np.repeat(np.arange(len(lengths)), lengths)  # example number of each token
            input_ids[j, :L] = tok
            # target of position t is token t + 1: trained on, and in the same example
            keep = mask[1:] & (seg[1:] == seg[:-1])
            labels[j, : L - 1] = np.where(keep, tok[1:], IGNORE_INDEX)
            positions[j, :L] = np.arange(L) - starts[seg]
            positions[j, L:] = np.arange(T - L)
            segments[j, :L] = seg
            segments[j, L:] = len(lengths)
        out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
               "position_ids": torch.from_numpy(positions)}
        if doc_mask:
            out["doc_mask"] = torch.from_numpy(segments)
        return out
