"""Filter throughput per core: Seedline's rule sets against datatrove's same filters, one process run.

Both run, single-threaded in this process, the FineWeb recipe's quality filters in its order (Gopher
repetition, Gopher quality, C4, FineWeb) with default thresholds on the same real documents
(``bench/real_text.py``: package docs, docstrings, Python sources of this machine); a document stops at the
first filter that removes it, and C4's kept lines are what FineWeb sees, in both. Both split English words
with spaCy's rule-based tokenizer (datatrove's English word tokenizer). The decisions are also compared.

Usage: ``python -m bench.filter [--docs 3000]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import time

from bench.real_text import real_documents


def seedline(docs: list[str]) -> list[str | None]:
    from stages.filter.apply import Filter
    from stages.filter.config import FilterConfig

    rules = Filter(FilterConfig(input="unused", gopher_repetition={}, gopher_quality={}, c4={}, fineweb={}))
    return [rules(t, {}).rule for t in docs]


def datatrove(docs: list[str]) -> list[str | None]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    steps = [("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
             ("c4", C4QualityFilter()), ("fineweb", FineWebQualityFilter())]
    out: list[str | None] = []
    for i, text in enumerate(docs):
        doc = Document(text=text, id=str(i))
        verdict = None
        for name, f in steps:
            r = f.filter(doc)
            if r is not True:
                verdict = name
                break
        out.append(verdict)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    args = ap.parse_args()
    docs = real_documents(args.docs)
    mb = sum(len(t.encode()) for t in docs) / 1e6
    # Warm both (spaCy tables, numba kernel) on a few documents outside the timing.
    seedline(docs[:20])
    datatrove(docs[:20])
    t0 = time.perf_counter()
    ours = seedline(docs)
    t1 = time.perf_counter()
    theirs = datatrove(docs)
    t2 = time.perf_counter()
    same = sum((a.split(".")[0] if a else None) == b for a, b in zip(ours, theirs, strict=True))
    s_rate, d_rate = len(docs) / (t1 - t0), len(docs) / (t2 - t1)
    print(f"{len(docs)} real documents, {mb:.1f} MB; removed: seedline {sum(x is not None for x in ours)}, "
          f"datatrove {sum(x is not None for x in theirs)}; same rule set decides on {same}/{len(docs)}")
    print(f"seedline  filters: {s_rate:8.1f} docs/s/core  {mb / (t1 - t0):6.2f} MB/s/core")
    print(f"datatrove filters: {d_rate:8.1f} docs/s/core  {mb / (t2 - t1):6.2f} MB/s/core")
    print(f"ratio seedline/datatrove: {s_rate / d_rate:.2f}x")


if __name__ == "__main__":
    main()
