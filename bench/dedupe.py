"""Benchmark: Seedline's dedupe stage against datasketch and datatrove, on the same real-text corpus.

    .venv/bin/python bench/dedupe.py [--mb 300] [--peers datasketch,datatrove] [--scale 1200]

The corpus is ``bench/corpora.py``'s: Python sources of the installed packages and the standard library,
then the standard library's pydoc pages, with planted near-duplicates whose true 5-gram Jaccard is
known (built once, cached under /tmp/seedline-bench-cache). In this process, on the same cores, one
after another:

(a) Seedline's dedupe stage end to end through ``run(config, ctx)`` on a local Ray started first (its
    start-up printed, not counted; a warm-up run on a small corpus first, also printed): read,
    quarantine, sign, bucket shuffle, components, filter, write Parquet. 5-gram shingles, LSH 16 bands
    x 8 rows (as datatrove below), default verification (hybrid).
(b) the datasketch recipe: parse each JSON line, word 5-gram shingles, ``MinHash.update_batch``, then
    ``MinHashLSH`` query + insert (its own band optimiser at threshold 0.8; one Python process).
(c) datatrove's 4-step MinHash pipeline (signatures, buckets, cluster, filter; 5-grams, 16 buckets x 8
    hashes) on ``LocalPipelineExecutor`` with 2 workers, reading the same JSONL and writing the kept
    documents.

Printed per system: seconds, docs/s, MB/s, and precision/recall/F1 at J >= 0.8 on the planted pairs (a
pair is found when both documents end in one duplicate cluster); then the ratios. ``--scale MB`` also
runs Seedline on a second corpus size and prints both sizes' seconds and driver peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __name__ == "__main__" and __package__ is None:  # run as a script: the repository root on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.corpora import Corpus, real_corpus  # noqa: E402

NGRAM = 5
THRESHOLD = 0.8
BANDS, ROWS = 16, 8


class PeakRSS:
    """The process's peak resident memory while the block runs (sampled every 20 ms), in MB."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 1e6


def quality(same_cluster, planted: list[tuple[str, str, float]]) -> tuple[float, float, float]:
    """Precision, recall, F1 at J >= THRESHOLD over the planted pairs; ``same_cluster(a, b)`` says whether
    a system put both documents in one duplicate cluster."""
    tp = fp = fn = 0
    for a, b, j in planted:
        found, true = same_cluster(a, b), j >= THRESHOLD
        tp += found and true
        fp += found and not true
        fn += true and not found
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


# --- Seedline ---------------------------------------------------------------------------------------


def _ctx(out: Path):
    import dataclasses

    from pipeline.stage import Progress, StageContext
    from pipeline.tracking import NullTracker

    fields = {f.name for f in dataclasses.fields(StageContext)}
    links = {"inputs": {}} if "inputs" in fields else {"upstream": {}}
    return StageContext(name="dedupe", out_dir=str(out), run_dir=str(out.parent), fingerprint="bench",
                        tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("bench"),
                        **links)


def seedline(corpus: Corpus, out: Path) -> tuple[float, float, dict]:
    """(seconds, driver peak RSS MB, stats)."""
    from stages.dedupe.config import DedupeConfig
    from stages.dedupe.run import run

    shutil.rmtree(out, ignore_errors=True)
    cfg = DedupeConfig(input=corpus.glob, id_field="id", bands=BANDS, rows=ROWS)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        stats = run(cfg, _ctx(out))
        dt = time.perf_counter() - t0
    return dt, mem.mb, stats


def seedline_clusters(out: Path):
    import pyarrow.parquet as pq

    kept = {d["id"]: d["kept_id"] for d in pq.read_table(out / "duplicates.parquet").to_pylist()}
    return lambda a, b: kept.get(a, a) == kept.get(b, b)


# --- datasketch -------------------------------------------------------------------------------------


def datasketch_recipe(corpus: Corpus):
    """The plain recipe, timed from reading the files to the last LSH query; (seconds, same_cluster)."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    links: list[tuple[str, str]] = []
    for p in corpus.files:
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                words = rec["text"].lower().split()
                m = MinHash(num_perm=128)
                m.update_batch({" ".join(words[j: j + NGRAM]).encode()
                                for j in range(max(1, len(words) - NGRAM + 1))})
                links += [(rec["id"], other) for other in lsh.query(m)]
                lsh.insert(rec["id"], m)
    dt = time.perf_counter() - t0
    return dt, _union_find(links)


def _union_find(links: list[tuple[str, str]]):
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    return lambda a, b: find(a) == find(b)


# --- datatrove --------------------------------------------------------------------------------------


def _xxhash32(data: str | bytes) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def _xxhash64(data: str | bytes) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def datatrove_pipeline(corpus: Corpus, work: Path, workers: int = 2):
    """datatrove's 4-step MinHash deduplication; (seconds, same_cluster).

    xxhash 4 no longer hashes ``str`` (it encoded it as UTF-8 before); datatrove 0.10 still passes
    shingles as ``str``, so its xxhash helpers get that encoding back (the same hashes as with xxhash 3).
    """
    import datatrove.utils.hashes.xxhash as dt_xxhash

    dt_xxhash.xxhash32, dt_xxhash.xxhash64 = _xxhash32, _xxhash64
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    shutil.rmtree(work, ignore_errors=True)
    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS)
    tasks = len(corpus.files)

    def reader():
        return JsonlReader(str(corpus.root), glob_pattern="part-*.jsonl")

    s1 = LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(str(work / "sigs"), config=cfg)],
                               tasks=tasks, workers=workers, logging_dir=str(work / "logs/1"))
    s2 = LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"),
                                                             config=cfg)],
                               tasks=BANDS, workers=workers, logging_dir=str(work / "logs/2"), depends=s1)
    s3 = LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove"),
                                                             config=cfg, save_cluster_id=True)],
                               tasks=1, logging_dir=str(work / "logs/3"), depends=s2)
    s4 = LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(
        str(work / "remove"), exclusion_writer=JsonlWriter(str(work / "removed")), load_cluster_ids=True),
        JsonlWriter(str(work / "kept"))], tasks=tasks, workers=workers, logging_dir=str(work / "logs/4"),
        depends=s3)
    t0 = time.perf_counter()
    s4.run()
    dt = time.perf_counter() - t0
    return dt, _datatrove_clusters(work)


def _datatrove_clusters(work: Path):
    import gzip

    cluster: dict[str, int] = {}
    for sub in ("kept", "removed"):
        for p in sorted((work / sub).glob("*.jsonl.gz")):
            with gzip.open(p, "rt", encoding="utf-8") as fh:
                for line in fh:
                    rec = json.loads(line)
                    c = rec.get("metadata", {}).get("minhash_cluster_id", -1)
                    if c != -1:
                        cluster[rec["id"]] = c
    return lambda a, b: a in cluster and cluster.get(a) == cluster.get(b)


# --- main -------------------------------------------------------------------------------------------


def _line(name: str, dt: float, corpus: Corpus, q: tuple[float, float, float], extra: str = "") -> str:
    p, r, f = q
    return (f"{name}: {dt:.1f} s  {corpus.docs / dt:,.0f} docs/s  {corpus.mb / dt:.1f} MB/s  "
            f"precision {p:.3f} recall {r:.3f} F1 {f:.3f}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=300.0, help="corpus size (MB of text)")
    ap.add_argument("--peers", default="datasketch,datatrove", help="comma list, or '' for Seedline only")
    ap.add_argument("--scale", type=float, default=None, help="also run Seedline on a corpus of this size")
    ap.add_argument("--workers", type=int, default=2, help="datatrove workers")
    ap.add_argument("--cache", default=None, help="corpus cache directory")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="seedline-bench-dedupe-"))
    corpus = real_corpus(args.mb, args.cache)
    n_true = sum(j >= THRESHOLD for _, _, j in corpus.planted)
    print(f"corpus: {corpus.docs} docs, {corpus.mb:.1f} MB JSONL in {len(corpus.files)} files (real Python "
          f"sources + stdlib pydoc), {len(corpus.planted)} planted copies ({n_true} at J>={THRESHOLD}), "
          f"{os.cpu_count()} CPUs", flush=True)

    import ray

    from pipeline.ray_init import init_ray

    t0 = time.perf_counter()
    import psutil

    me = psutil.Process()
    for attempt in range(5):  # a loaded shared machine can miss Ray's fixed 30 s raylet start-up wait
        before = {c.pid for c in me.children()}
        try:
            init_ray(None)
            break
        except Exception as e:  # noqa: BLE001
            print(f"ray start failed ({e}); retrying", file=sys.stderr, flush=True)
            ray.shutdown()
            # A failed start leaves its GCS and dashboard running: stop what this attempt started.
            for c in me.children():
                if c.pid not in before:
                    c.kill()
            if attempt == 4:
                raise
    cpus = int(ray.cluster_resources()["CPU"])
    print(f"ray start: {time.perf_counter() - t0:.1f} s ({cpus} CPUs; not counted below)", flush=True)
    warm = real_corpus(2, args.cache)
    t0 = time.perf_counter()
    seedline(warm, work / "warm")
    print(f"warm-up (2 MB corpus: workers started, kernels loaded): {time.perf_counter() - t0:.1f} s",
          flush=True)

    dt_s, rss_s, stats = seedline(corpus, work / "seedline")
    q_s = quality(seedline_clusters(work / "seedline"), corpus.planted)
    print(_line("seedline dedupe", dt_s, corpus, q_s,
                f"  ({stats['exact_duplicates']} exact + {stats['near_duplicates']} near removed, "
                f"LSH {stats['lsh_bands']}x{stats['lsh_rows']}, {cpus} cores, "
                f"driver peak RSS {rss_s:.0f} MB)"),
          flush=True)
    peers = [p for p in args.peers.split(",") if p]
    if "datatrove" in peers:
        dt_t, same = datatrove_pipeline(corpus, work / "datatrove", args.workers)
        print(_line("datatrove minhash (4 steps)", dt_t, corpus, quality(same, corpus.planted),
                    f"  ({args.workers} workers)"), flush=True)
        per_core = dt_t * args.workers / (dt_s * cpus)
        print(f"ratio seedline / datatrove: {dt_t / dt_s:.2f}x wall, {per_core:.2f}x per core "
              "(target >= 5x per core; >= 1x on a 38 MB corpus)", flush=True)
    if "datasketch" in peers:
        dt_b, same = datasketch_recipe(corpus)
        print(_line("datasketch recipe", dt_b, corpus, quality(same, corpus.planted), "  (1 process)"),
              flush=True)
        print(f"ratio seedline / datasketch: {dt_b / dt_s:.2f}x end to end (target >= 10x on 300 MB)",
              flush=True)
    if args.scale:
        big = real_corpus(args.scale, args.cache)
        dt_l, rss_l, _ = seedline(big, work / "seedline-scale")
        print(f"scale: {corpus.mb:.0f} MB {dt_s:.1f} s peak RSS {rss_s:.0f} MB; {big.mb:.0f} MB {dt_l:.1f} s "
              f"peak RSS {rss_l:.0f} MB; time x{dt_l / dt_s:.2f} for data x{big.mb / corpus.mb:.2f}, "
              f"RSS x{rss_l / rss_s:.2f}", flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
