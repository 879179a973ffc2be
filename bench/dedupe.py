"""Benchmark: Seedline's dedupe stage against the plain datasketch recipe, on the same corpus.

    .venv/bin/python bench/dedupe.py [--docs 100000] [--files 16] [--workdir DIR]

One corpus of ~2 KB documents (Zipfian vocabulary) with planted duplicates: a share of the originals
gets one copy mutated to a random Jaccard level in [0.5, 1] (some exact). Both systems run in this
process on the same files and cores:

(a) the datasketch recipe: parse each JSON line, word 5-gram shingles, ``MinHash.update_batch``, then
    ``MinHashLSH`` query + insert (datasketch's own band optimiser; one Python process);
(b) Seedline's dedupe stage end to end (read, quarantine, sign, Ray Data bucket shuffle, components,
    write Parquet), through its ``run(config, ctx)`` on a local Ray.

It prints docs/s and MB/s of each and the ratio, then pair-level precision, recall and F1 against
exact shingle Jaccard at the threshold (pairs predicted = pairs of documents in one cluster), for each
of Seedline's verification modes (``hybrid``, the default; ``estimate``; ``exact``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.dedupe.config import DedupeConfig
from stages.dedupe.minhash import shingles
from stages.dedupe.run import run as run_dedupe

NGRAM = 5
THRESHOLD = 0.8


def make_corpus(root: Path, n_docs: int, n_files: int, seed: int = 0) -> list[tuple[int, int]]:
    """Write ``n_files`` JSONL files; return planted (original, copy) pairs as global doc indices."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(50_000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 0.9
    weights /= weights.sum()
    n_orig = int(n_docs * 0.8)
    ids = nprng.choice(len(vocab), size=(n_orig, 330), p=weights)
    docs = [" ".join(vocab[i] for i in row) for row in ids]
    pairs = []
    for k in range(n_docs - n_orig):
        src = k * (n_orig // (n_docs - n_orig))
        target = rng.uniform(0.5, 1.0)
        words = docs[src].split()
        n_sh = len(words) - NGRAM + 1
        m = int(round(n_sh * (1 - target) / (NGRAM * (1 + target))))
        for pos in rng.sample(range(len(words)), m):
            words[pos] = rng.choice(vocab)
        docs.append(" ".join(words))
        pairs.append((src, len(docs) - 1))
    order = list(range(len(docs)))
    rng.shuffle(order)  # copies land anywhere, also before their original
    where = {d: i for i, d in enumerate(order)}
    per_file = (len(order) + n_files - 1) // n_files
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        with open(root / f"part-{f:03d}.jsonl", "w") as fh:
            for d in order[f * per_file : (f + 1) * per_file]:
                fh.write(json.dumps({"text": docs[d], "source": "bench"}) + "\n")
    return [(where[a], where[b]) for a, b in pairs]


def read_corpus(root: Path) -> list[str]:
    texts = []
    for p in sorted(root.glob("*.jsonl")):
        with open(p) as fh:
            texts.extend(json.loads(line)["text"] for line in fh)
    return texts


def datasketch_recipe(root: Path) -> tuple[float, set[tuple[int, int]]]:
    """The plain recipe, timed from reading the files to the last LSH query; returns (seconds, pairs)."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    pairs: set[tuple[int, int]] = set()
    i = 0
    for p in sorted(root.glob("*.jsonl")):
        with open(p) as fh:
            for line in fh:
                words = json.loads(line)["text"].lower().split()
                m = MinHash(num_perm=128)
                m.update_batch({" ".join(words[j : j + NGRAM]).encode()
                                for j in range(len(words) - NGRAM + 1)})
                for other in lsh.query(m):
                    pairs.add((other, i))
                lsh.insert(i, m)
                i += 1
    return time.perf_counter() - t0, pairs


def ctx_for(out: Path) -> StageContext:
    return StageContext(name="dedupe", out_dir=str(out), run_dir=str(out.parent), fingerprint="bench",
                        upstream={}, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("bench"))


def seedline_pairs(out: Path, n_docs: int) -> set[tuple[int, int]]:
    """Pairs of documents (global indices) that share a kept document."""
    dups = pq.read_table(out / "duplicates.parquet").to_pylist()

    def index(doc_id: str) -> int:  # ids are "part-NNN.jsonl:<line>"; files hold equal shares
        name, line = doc_id.rsplit(":", 1)
        return int(name[5:8]) * per_file + int(line) - 1

    per_file = _per_file[0]
    groups: dict[int, list[int]] = {}
    for d in dups:
        groups.setdefault(index(d["kept_id"]), []).append(index(d["id"]))
    pairs = set()
    for kept, members in groups.items():
        allm = sorted([kept, *members])
        pairs.update((a, b) for x, a in enumerate(allm) for b in allm[x + 1 :])
    return pairs


_per_file = [0]


def jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a, NGRAM)), set(shingles(b, NGRAM))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def quality(pred: set[tuple[int, int]], planted: list[tuple[int, int]],
            texts: list[str]) -> tuple[float, ...]:
    truth = {tuple(sorted(p)) for p in planted if jaccard(texts[p[0]], texts[p[1]]) >= THRESHOLD}
    pred = {tuple(sorted(p)) for p in pred}
    extra = {p for p in pred - truth if jaccard(texts[p[0]], texts[p[1]]) >= THRESHOLD}
    truth |= extra
    tp = len(pred & truth)
    precision = tp / len(pred) if pred else 1.0
    recall = tp / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, len(truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="seedline-bench-dedupe-"))
    corpus = work / "corpus"
    planted = make_corpus(corpus, args.docs, args.files)
    _per_file[0] = (args.docs + args.files - 1) // args.files
    texts = read_corpus(corpus)
    mb = sum(p.stat().st_size for p in corpus.glob("*.jsonl")) / 1e6
    print(f"corpus: {len(texts)} docs, {mb:.1f} MB JSONL in {args.files} files, "
          f"{len(planted)} planted copies, mean {mb * 1e6 / len(texts):.0f} B/doc")

    import ray

    from pipeline.ray_init import init_ray

    t0 = time.perf_counter()
    init_ray(None)
    cpus = int(ray.cluster_resources()["CPU"])
    print(f"ray start: {time.perf_counter() - t0:.1f}s ({cpus} CPUs; not counted below)")
    # Warm-up on a separate 20k-document corpus: starts the Ray workers, loads the compiled kernels and
    # lets their allocators grow, as on a long-lived cluster. Cold first-run costs are printed, not hidden.
    warm = work / "warm"
    make_corpus(warm, 20_000, 4, seed=1)
    t0 = time.perf_counter()
    run_dedupe(DedupeConfig(input=str(warm / "*.jsonl")), ctx_for(work / "warm-out"))
    print(f"warm-up (cold workers, 20,000 other docs): {time.perf_counter() - t0:.1f}s")

    results = {}
    for verify in ("hybrid", "estimate", "exact"):  # hybrid is the default
        out = work / f"out-{verify}"
        t0 = time.perf_counter()
        stats = run_dedupe(DedupeConfig(input=str(corpus / "*.jsonl"), verify=verify), ctx_for(out))
        dt = time.perf_counter() - t0
        results[verify] = (dt, quality(seedline_pairs(out, len(texts)), planted, texts))
        print(f"seedline dedupe (verify={verify}): {dt:.1f}s  {len(texts) / dt:,.0f} docs/s  "
              f"{mb / dt:.1f} MB/s "
              f"({stats['exact_duplicates']} exact + {stats['near_duplicates']} near removed, "
              f"LSH {stats['lsh_bands']}x{stats['lsh_rows']})")
    if not args.skip_baseline:
        dt_b, base_pairs = datasketch_recipe(corpus)
        print(f"datasketch recipe: {dt_b:.1f}s  {len(texts) / dt_b:,.0f} docs/s  {mb / dt_b:.1f} MB/s "
              f"(1 process)")
        for verify, (dt_s, _) in results.items():
            default = " (default)" if verify == "hybrid" else ""
            print(f"ratio seedline verify={verify}{default} / datasketch throughput: {dt_b / dt_s:.1f}x "
                  f"(per core: {dt_b / (dt_s * cpus):.1f}x)")
        p, r, f, n_truth = quality(base_pairs, planted, texts)
        print(f"quality datasketch recipe (LSH candidates, no verification): precision {p:.3f} "
              f"recall {r:.3f} F1 {f:.3f}")
    for verify, (_, (p, r, f, n_truth)) in results.items():
        print(f"quality seedline verify={verify}: precision {p:.3f} recall {r:.3f} F1 {f:.3f} "
              f"({n_truth} true pairs at J>={THRESHOLD})")


if __name__ == "__main__":
    main()
