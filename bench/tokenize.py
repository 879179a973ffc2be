"""Benchmark: Seedline's tokenize stage against raw HF ``Tokenizer.encode_batch``, on the same documents.

    .venv/bin/python bench/tokenize.py [--mb 40] [--files 8] [--repeats 2] [--workdir DIR]

The corpus is real text: the source and documentation files (.py, .md, .rst, .txt) of the installed
Python packages, in sorted order, up to ``--mb`` MB of characters, written as dedupe-style Parquet parts
(``id``, ``text``). A byte-level BPE (32k vocab) is trained once on a sample and saved; both sides use
that same ``tokenizer.json`` (the stage gets it as ``tokenizer.path``, so training time is excluded).
In this process, on the same cores, alternating ``--repeats`` times:

(a) raw: ``Tokenizer.encode_batch(docs, add_special_tokens=False)`` over all documents (texts already in
    memory, batches of 1000 documents; rayon uses every core); also ``encode_batch_fast`` (no offsets),
    which is what the stage calls, for a stricter ratio;
(b) Seedline: the tokenize stage end to end through ``run(config, ctx)`` on a local Ray already started
    (read Parquet, split train/val, cut long documents, encode, append end-of-text, pack, write Arrow
    shards with sha256, manifest). Ray's start-up is timed and printed separately: a fixed cost.

Throughput is document tokens per second (the stage's appended end-of-text tokens are not counted);
best of the repeats on each side, then the ratio.
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
    """Text files of the installed packages, sorted by path, until ``max_chars`` characters."""
    from pathlib import Path

    import pyarrow as pa

    root = Path(pa.__file__).resolve().parent.parent  # site-packages
    docs, total = [], 0
    for p in sorted(root.rglob("*")):
        if p.suffix not in (".py", ".md", ".rst", ".txt") or not p.is_file():
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
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


def stage(tok_path: Path, dedupe: Path, out: Path) -> tuple[int, float]:
    import logging
    import shutil
    import time

    from pipeline.stage import Progress, StageContext, Upstream
    from pipeline.tracking import NullTracker
    from stages.tokenize.config import TokenizeConfig
    from stages.tokenize.run import run as run_tokenize

    shutil.rmtree(out, ignore_errors=True)
    ctx = StageContext(name="tokenize", out_dir=str(out), run_dir=str(out.parent), fingerprint="bench",
                       upstream={"dedupe": Upstream("dedupe", str(dedupe), "bench", {})},
                       tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("bench"))
    cfg = TokenizeConfig(tokenizer={"path": str(tok_path)}, seq_len=2048, val_fraction=0.01,
                         rows_per_shard=1024)
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
    write_parts(docs, work / "dedupe" / "data", args.files)
    tok = train_bpe(docs[:: max(1, len(docs) // 2000)], TrainTokenizer(vocab_size=32000, sample_docs=2000))
    save(tok, str(work / "tokenizer"), 2048)
    tok_path = work / "tokenizer" / "tokenizer.json"
    cpus = os.cpu_count()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M chars, {args.files} parts, "
          f"{cpus} CPUs", flush=True)

    t0 = time.perf_counter()
    init_ray(None, None)
    print(f"ray start-up (fixed cost, not in the stage time): {time.perf_counter() - t0:.1f} s", flush=True)
    raw_best = fast_best = stage_best = 0.0
    for rep in range(args.repeats):
        n_raw, s_raw = raw(tok_path, docs)
        raw_best = max(raw_best, n_raw / s_raw)
        print(f"[{rep}] raw Tokenizer.encode_batch: {n_raw} tokens in {s_raw:.2f} s = "
              f"{n_raw / s_raw / 1e6:.3f} M tokens/s", flush=True)
        n_fast, s_fast = raw(tok_path, docs, "encode_batch_fast")
        fast_best = max(fast_best, n_fast / s_fast)
        print(f"[{rep}] raw encode_batch_fast:      {n_fast} tokens in {s_fast:.2f} s = "
              f"{n_fast / s_fast / 1e6:.3f} M tokens/s", flush=True)
        n_st, s_st = stage(tok_path, work / "dedupe", work / "out")
        stage_best = max(stage_best, n_st / s_st)
        print(f"[{rep}] seedline tokenize stage:    {n_st} tokens in {s_st:.2f} s = "
              f"{n_st / s_st / 1e6:.3f} M tokens/s", flush=True)
        if n_st != n_raw:
            print(f"note: token counts differ ({n_st} vs {n_raw}): long documents are cut before encoding",
                  file=sys.stderr)
    print(f"raw encode_batch best: {raw_best / 1e6:.3f} M tokens/s; seedline stage best: "
          f"{stage_best / 1e6:.3f} M tokens/s; ratio stage/raw = {stage_best / raw_best:.3f} "
          "(target >= 0.85)")
    print(f"stricter, against raw encode_batch_fast (no offsets, what the stage calls) best "
          f"{fast_best / 1e6:.3f} M tokens/s: ratio stage/raw_fast = {stage_best / fast_best:.3f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
