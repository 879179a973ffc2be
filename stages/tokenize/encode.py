"""Encode step (a Ray task per input file): read, quarantine, split train/val, encode, append end-of-text.

Encoding goes through tiktoken when the driver found that it gives the HF tokenizer's exact ids
(``fast_bpe``), else through HF ``tokenizers``.

Output per input file and split: ``work/enc/NNNNN-<split>.arrow``, an Arrow IPC file with one column
``ids`` (``large_list<uint16|uint32>``): one row per document, its tokens followed by end-of-text. Record
batches follow encode batches; the pack step reads them memory-mapped. The marker
``work/enc/NNNNN.json`` (the file's stats) is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from pipeline import storage
from stages.common.records import InputFile, Record, RecordReader, Reject
from stages.tokenize import fast_bpe
from stages.tokenize.layout import SPLITS, Layout
from stages.tokenize.sources import Sources, is_val, split_text


@dataclass(frozen=True)
class EncodeParams:
    """What the encode task needs besides the file (all of it decided by the driver)."""

    seed: int
    val_threshold: int
    max_chunk_chars: int
    batch_chars: int
    eot: int
    dtype: str
    engine: str = "tokenizers"  # or "tiktoken": same ids, faster (``fast_bpe``; the driver checked it)
    threads: int = 1  # tiktoken threads per task (cores left over when there are fewer files than cores)


def encoded_schema(dtype: str) -> pa.Schema:
    return pa.schema([pa.field("ids", pa.large_list(pa.field("item", pa.from_numpy_dtype(np.dtype(dtype)),
                                                               nullable=False)), nullable=False)])


_TOKENIZERS: dict[str, Tokenizer] = {}


def worker_tokenizer(tok_json: str) -> Tokenizer:
    """The tokenizer, parsed once per worker process, set to encode special-token text as plain text.

    A document that literally contains ``<|endoftext|>`` must not produce the end-of-text id: document
    boundaries are only the ones the stage appends.
    """
    key = hashlib.sha256(tok_json.encode("utf-8")).hexdigest()
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = Tokenizer.from_str(tok_json)
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tok
    return tok


Encode = Callable[[list[str]], list[Sequence[int]]]
_ENCODERS: dict[tuple[str, str, int], Encode] = {}


def worker_encoder(tok_json: str, engine: str, threads: int = 1) -> Encode:
    """``texts -> token id lists`` (no special tokens added, special-token text encoded as plain text),
    built once per worker process: HF ``tokenizers``, or tiktoken with the same ids (``fast_bpe``)."""
    key = (hashlib.sha256(tok_json.encode("utf-8")).hexdigest(), engine, threads)
    fn = _ENCODERS.get(key)
    if fn is None:
        if engine == "tiktoken":
            fn = _tiktoken_encode(fast_bpe.build(tok_json, check_tokens=False), threads)
        else:
            tok = worker_tokenizer(tok_json)

            def fn(texts: list[str]) -> list[Sequence[int]]:
                return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        _ENCODERS.clear()
        _ENCODERS[key] = fn
    return fn


def _tiktoken_encode(enc: Any, threads: int) -> Encode:
    def encode(texts: list[str]) -> list[Sequence[int]]:
        for t in texts:
            if not t.isascii():
                # tiktoken would silently replace a lone surrogate; ``tokenizers`` refuses the text.
                t.encode("utf-8")
        if threads > 1:
            return enc.encode_ordinary_batch(texts, num_threads=threads)
        return [enc.encode_ordinary(t) for t in texts]
    return encode


def _batches(reader: RecordReader, max_chars: int):
    batch: list[Record] = []
    chars = 0
    for rec in reader:
        batch.append(rec)
        chars += len(rec.text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _SplitBuffer:
    """Token id lists of one split's documents in the current batch, flattened once per batch."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.lengths: list[int] = []

    def add(self, pieces: list[Any], eot: tuple[int]) -> None:
        n = 1
        for ids in pieces:
            self.parts.append(ids)
            n += len(ids)
        self.parts.append(eot)
        self.lengths.append(n)

    def take(self, dtype: str) -> pa.RecordBatch | None:
        if not self.lengths:
            return None
        offsets = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(self.parts), np.dtype(dtype), count=int(offsets[-1]))
        self.parts, self.lengths = [], []
        ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
        return pa.record_batch([ids], schema=encoded_schema(dtype))


def _encode_batch(encode: Encode, batch: list[Record], p: EncodeParams, bufs: dict[str, _SplitBuffer],
                  stats: dict[str, Any]) -> None:
    texts: list[str] = []
    counts: list[int] = []
    for rec in batch:
        pieces = split_text(rec.text, p.max_chunk_chars)
        texts.extend(pieces)
        counts.append(len(pieces))
        stats["docs_cut"] += len(pieces) > 1
    encodings = encode(texts)
    eot = (p.eot,)
    i = 0
    for rec, k in zip(batch, counts, strict=True):
        split = "val" if is_val(rec.id, p.seed, p.val_threshold) else "train"
        bufs[split].add(encodings[i:i + k], eot)
        stats["docs"][split] += 1
        stats["chars"][split] += len(rec.text)
        i += k


def encode_file(sources: Sources, f: InputFile, tok_json: str, p: EncodeParams, out: str) -> dict[str, Any]:
    """Encode one input file into ``work/enc``; returns (and writes as its marker) the file's stats."""
    lay = Layout(out)
    encode = worker_encoder(tok_json, p.engine, p.threads)
    rejects: list[Reject] = []
    reader = sources.reader(f, rejects)
    stats: dict[str, Any] = {"source": f.index, "file": f.path, "docs_cut": 0,
                             "docs": dict.fromkeys(SPLITS, 0), "chars": dict.fromkeys(SPLITS, 0),
                             "tokens": dict.fromkeys(SPLITS, 0)}
    bufs = {s: _SplitBuffer() for s in SPLITS}
    with contextlib.ExitStack() as stack:
        writers = {}
        for s in SPLITS:
            tmp = stack.enter_context(storage.atomic_local_file(lay.encoded(f.index, s)))
            sink = stack.enter_context(pa.OSFile(str(tmp), "wb"))
            writers[s] = stack.enter_context(pa.ipc.new_file(sink, encoded_schema(p.dtype)))
        for batch in _batches(reader, p.batch_chars):
            _encode_batch(encode, batch, p, bufs, stats)
            for s in SPLITS:
                rb = bufs[s].take(p.dtype)
                if rb is not None:
                    stats["tokens"][s] += len(rb.column(0).values)
                    writers[s].write_batch(rb)
    if rejects:
        lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects)
        storage.write_text(lay.rejects(f.index), lines)
    stats.update(docs_in=reader.lines, docs_rejected=len(rejects),
                 reject_reasons=dict(sorted(Counter(r.reason.split(":")[0] for r in rejects).items())))
    storage.write_json(lay.encode_done(f.index), stats)
    return stats
