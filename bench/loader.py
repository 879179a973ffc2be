"""Benchmark: tokens per second the packed-shard loader delivers, shuffled (random access over shards).

    .venv/bin/python bench/loader.py [--tokens 50e6] [--seq-len 2048] [--batch 8] [--seconds 5]

Shards are written by the tokenize stage's own pack step from a synthetic token stream (documents of
random length, uint16), so no Ray or tokenizer is needed. Measured in one process, the same rows:

(a) anchor: a Megatron-style flat ``numpy.memmap`` of the stream; a batch is ``B`` random windows of
    ``seq_len + 1`` tokens cast to int64 (input and label views only: no positions, no masks);
(b) Seedline: ``Loader(PackedDataset(...), batch_size, shuffle=True)`` yielding the full batch contract
    (``input_ids``, ``labels`` with -100 on padding, ``position_ids`` reset per document) as torch
    tensors; then again with ``doc_mask=True``.

Files are in the page cache (just written): this is the loader's own cost, not the disk's.
Target: at least 10 M tokens/s per process.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import storage
from stages.lm.data import Loader, PackedDataset
from stages.tokenize.config import TokenizeConfig
from stages.tokenize.encode import encoded_schema
from stages.tokenize.finalize import build_manifest
from stages.tokenize.layout import SPLITS, Layout
from stages.tokenize.pack import SplitPlan, pack_shard

IDS = {"eot": 0, "pad": 1, "im_start": 2, "im_end": 3}


def write_shards(out: Path, n_tokens: int, seq_len: int, rows_per_shard: int) -> np.ndarray:
    """Pack a synthetic stream (documents of 50-5000 tokens) as the train split; returns the stream."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 5000, n_tokens // 2000)
    stream = rng.integers(4, 32000, int(lengths.sum()), dtype=np.uint16)
    ends = np.cumsum(lengths) - 1
    stream[ends] = IDS["eot"]
    lay = Layout(str(out))
    for split in SPLITS:
        mine = split == "train"
        offsets = np.concatenate([[0], ends + 1]) if mine else np.zeros(1, np.int64)
        values = stream if mine else np.empty(0, np.uint16)
        ids = pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))
        batch = pa.record_batch([ids], schema=encoded_schema("uint16"))
        with storage.atomic_local_file(lay.encoded(0, split)) as tmp, pa.OSFile(str(tmp), "wb") as f, \
                pa.ipc.new_file(f, batch.schema) as w:
            w.write_batch(batch)
    toks = {"train": [len(stream)], "val": [0]}
    plans = {s: SplitPlan(s, [lay.encoded(0, s)], toks[s], seq_len, rows_per_shard, "uint16", IDS["pad"])
             for s in SPLITS}
    packed = {(s, k): pack_shard(plans[s], k, str(out)) for s in SPLITS for k in range(plans[s].shards)}
    cfg = TokenizeConfig(input="x", tokenizer={"path": "x"}, seq_len=seq_len, rows_per_shard=rows_per_shard)
    info = {"dtype": "uint16", "vocab_size": 32000, "sha256": "0" * 64, "special_token_ids": IDS}
    enc = [{"docs": {"train": len(lengths), "val": 0}}]
    storage.write_json(lay.manifest, build_manifest(cfg, info, plans, enc, packed))
    for s in SPLITS:
        storage.remove(lay.encoded(0, s))
    return stream


def anchor(stream_path: Path, n_rows: int, seq_len: int, batch: int, seconds: float) -> float:
    mm = np.memmap(stream_path, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rows = rng.integers(0, n_rows, batch)
        x = np.stack([mm[r * seq_len: r * seq_len + seq_len + 1] for r in rows]).astype(np.int64)
        _inp, _lab = x[:, :-1], x[:, 1:]
        n += batch * seq_len
    return n / (time.perf_counter() - t0)


def seedline(ds: PackedDataset, batch: int, seconds: float, doc_mask: bool) -> float:
    loader = Loader(ds, batch, seed=1, shuffle=True, doc_mask=doc_mask)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(loader)
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=50e6)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows-per-shard", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        stream = write_shards(work / "tok", int(args.tokens), args.seq_len, args.rows_per_shard)
        stream.tofile(work / "stream.bin")
        ds = PackedDataset(work / "tok", "train")
        shards = len(ds.manifest["splits"]["train"]["shards"])
        print(f"{len(ds)} rows of {args.seq_len + 1} tokens in {shards} "
              f"shards ({len(stream) / 1e6:.1f} M tokens), batch {args.batch}", flush=True)
        a = anchor(work / "stream.bin", len(ds) - 1, args.seq_len, args.batch, args.seconds)
        print(f"anchor numpy.memmap random windows: {a / 1e6:.1f} M tokens/s", flush=True)
        s = seedline(ds, args.batch, args.seconds, doc_mask=False)
        print(f"seedline Loader (shuffled):          {s / 1e6:.1f} M tokens/s; ratio to anchor {s / a:.2f}",
              flush=True)
        d = seedline(ds, args.batch, args.seconds, doc_mask=True)
        print(f"seedline Loader (shuffled, doc_mask): {d / 1e6:.1f} M tokens/s; ratio to anchor {d / a:.2f} "
              f"(target >= 10 M tokens/s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
