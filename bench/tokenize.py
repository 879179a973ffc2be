"""Benchmark: Seedline's tokenize stage against raw HF ``Tokenizer.encode_batch``, on the same documents.

    .venv/bin/python bench/tokenize.py [--mb 40] [--files 8] [--repeats 2] [--workdir DIR]

The corpus is real text: the first ``--mb`` MB of ``bench/corpora.py``'s corpus (Python sources of the
installed packages and the standard library, then the standard library's pydoc pages), written as
Parquet parts (``id``, ``text``). A byte-level BPE (32k vocab) is trained once on a sample and saved;
every side uses that same ``tokenizer.json`` (the stage gets it as ``tokenizer.path``, so training time
is excluded). In this process, on the same cores, alternating ``--repeats`` times:

(a) raw: ``Tokenizer.encode_batch(docs, add_special_tokens=False)`` over all documents (texts already in
    memory, batches of 1000 documents; rayon uses every core); also ``encode_batch_fast`` (no offsets);
(b) tiktoken with the trained merges (``stages.tokenize.fast_bpe``), ``encode_ordinary_batch`` on every
    core, texts in memory; its ids are compared with (a)'s, all of them;
(c) Seedline: the tokenize stage end to end through ``run(config, ctx)`` on a local Ray already started
    (read Parquet, split train/val, cut long documents, encode, append end-of-text, pack, write Arrow
    shards with sha256, manifest). Ray's start-up is timed and printed separately: a fixed cost.

Throughput is document tokens per second (the stage's appended end-of-text tokens are not counted);
best of the repeats on each side, then the ratios.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

# This file's name is the standard library's ``tokenize`` (which inspect, linecache and logging import).
# Run as a script, its directory comes first on sys.path: put the repository root there instead.
if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == _BENCH_DIR:
    sys.path[0] = os.path.dirname(_BENCH_DIR)
# Found by another script in bench/ importing the standard ``tokenize``: hand over the real module (the
# import system returns whatever sys.modules holds once this body has run). Everything below only
# defines functions, with their imports inside, so nothing else happens in that case.
if __name__ == "tokenize":
    import importlib

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]
    del sys.modules["tokenize"]
    sys.modules["tokenize"] = importlib.import_module("tokenize")


def corpus(max_chars: int) -> list[str]:
    """The first ``max_chars`` characters' worth of documents of the real-text benchmark corpus."""
    from bench.corpora import base_documents

    docs, total = [], 0
    for _, text in base_documents():
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def write_parts(docs: list[str], data: Path, n_files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data.mkdir(parents=True)
    for k in range(n_files):
        idx = list(range(k, len(docs), n_files))
        pq.write_table(pa.table({"id": [f"doc{i}" for i in idx], "text": [docs[i] for i in idx]}),
                       data / f"part-{k:05d}.parquet")


def raw(tok_path: Path, docs: list[str], method: str = "encode_batch") -> tuple[int, float]:
    import time

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    encode = getattr(tok, method)
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(docs), 1000):
        n += sum(len(e) for e in encode(docs[i:i + 1000], add_special_tokens=False))
    return n, time.perf_counter() - t0


def fast(tok_path: Path, docs: list[str]) -> tuple[list[list[int]], float]:
    import os
    import time

    from stages.tokenize.fast_bpe import build

    enc = build(tok_path.read_text())
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
    return ids, time.perf_counter() - t0


def stage(tok_path: Path, data: Path, out: Path, encoder: str = "auto") -> tuple[int, float]:
    import dataclasses
    import logging
    import shutil
    import time

    from pipeline.stage import Progress, StageContext
    from pipeline.tracking import NullTracker
    from stages.tokenize.config import TokenizeConfig
    from stages.tokenize.run import run as run_tokenize

    shutil.rmtree(out, ignore_errors=True)
    fields = {f.name for f in dataclasses.fields(StageContext)}
    links = {"inputs": {}} if "inputs" in fields else {"upstream": {}}
    ctx = StageContext(name="tokenize", out_dir=str(out), run_dir=str(out.parent), fingerprint="bench",
                       tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("bench"),
                       **links)
    cfg = TokenizeConfig(input=str(data / "part-*.parquet"), id_field="id", tokenizer={"path": str(tok_path)},
                         seq_len=2048, val_fraction=0.01, rows_per_shard=1024, encoder=encoder)
    t0 = time.perf_counter()
    stats = run_tokenize(cfg, ctx)
    return stats["tokens"] - stats["docs"], time.perf_counter() - t0


def main() -> None:
    import argparse
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from pipeline.ray_init import init_ray
    from stages.tokenize.config import TrainTokenizer
    from stages.tokenize.tokenizer import save, train_bpe

    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=40.0, help="MB (millions of characters) of text")
    ap.add_argument("--files", type=int, default=8, help="Parquet parts (Ray encode tasks)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-"))
    docs = corpus(int(args.mb * 1e6))
    write_parts(docs, work / "data", args.files)
    tok = train_bpe(docs[:: max(1, len(docs) // 2000)], TrainTokenizer(vocab_size=32000, sample_docs=2000))
    save(tok, str(work / "tokenizer"), 2048)
    tok_path = work / "tokenizer" / "tokenizer.json"
    cpus = os.cpu_count()
    print(f"corpus: {len(docs)} real documents (installed packages' and stdlib Python sources), "
          f"{sum(map(len, docs)) / 1e6:.1f} M chars, {args.files} parts, {cpus} CPUs", flush=True)

    t0 = time.perf_counter()
    init_ray(None, None)
    print(f"ray start-up (fixed cost, not in the stage time): {time.perf_counter() - t0:.1f} s", flush=True)
    best = {"raw": 0.0, "raw_fast": 0.0, "tiktoken": 0.0, "stage": 0.0}
    for rep in range(args.repeats):
        n_raw, s_raw = raw(tok_path, docs)
        best["raw"] = max(best["raw"], n_raw / s_raw)
        print(f"[{rep}] raw Tokenizer.encode_batch:   {n_raw} tokens in {s_raw:.2f} s = "
              f"{n_raw / s_raw / 1e6:.3f} M tokens/s", flush=True)
        n_fast, s_fast = raw(tok_path, docs, "encode_batch_fast")
        best["raw_fast"] = max(best["raw_fast"], n_fast / s_fast)
        print(f"[{rep}] raw encode_batch_fast:        {n_fast} tokens in {s_fast:.2f} s = "
              f"{n_fast / s_fast / 1e6:.3f} M tokens/s", flush=True)
        ids, s_tk = fast(tok_path, docs)
        n_tk = sum(map(len, ids))
        best["tiktoken"] = max(best["tiktoken"], n_tk / s_tk)
        print(f"[{rep}] tiktoken, trained merges:     {n_tk} tokens in {s_tk:.2f} s = "
              f"{n_tk / s_tk / 1e6:.3f} M tokens/s", flush=True)
        if rep == 0:
            from tokenizers import Tokenizer

            hf = Tokenizer.from_file(str(tok_path))
            hf.encode_special_tokens = True
            same = all(e.ids == list(t) for i in range(0, len(docs), 1000) for e, t in
                       zip(hf.encode_batch_fast(docs[i:i + 1000], add_special_tokens=False), ids[i:i + 1000],
                           strict=True))
            print(f"identical ids, tiktoken vs HF tokenizers, all {len(docs)} documents: {same}", flush=True)
        n_st, s_st = stage(tok_path, work / "data", work / "out")
        best["stage"] = max(best["stage"], n_st / s_st)
        print(f"[{rep}] seedline tokenize stage:      {n_st} tokens in {s_st:.2f} s = "
              f"{n_st / s_st / 1e6:.3f} M tokens/s (read, encode, pack, write)", flush=True)
    print(f"raw encode_batch best {best['raw'] / 1e6:.3f} M tokens/s; seedline stage best "
          f"{best['stage'] / 1e6:.3f} M tokens/s; ratio stage/raw = {best['stage'] / best['raw']:.2f}x "
          "(target >= 2x)")
    print(f"stricter, against raw encode_batch_fast best {best['raw_fast'] / 1e6:.3f} M tokens/s: "
          f"ratio stage/raw_fast = {best['stage'] / best['raw_fast']:.2f}x; tiktoken alone "
          f"{best['tiktoken'] / 1e6:.3f} M tokens/s = {best['tiktoken'] / best['raw']:.2f}x raw encode_batch")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
