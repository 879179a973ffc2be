"""Real-text benchmark corpora from what every machine has, with planted near-duplicates; built once, cached.

    .venv/bin/python bench/corpora.py --mb 300 [--cache DIR]     # build (or find) and print the corpus

Documents, in a fixed order: the Python sources of the installed packages (site-packages) and of the
standard library, then the standard library's documentation (pydoc pages of its documented members,
rendered as ``seedline example-data`` renders them). Each source file is one document (at most
``MAX_CHARS`` characters). When the machine holds less text than asked for, later *rounds* reuse the
documents with every fourth word suffixed by the round number, so that no 5-word shingle repeats
across rounds (rounds are not duplicates of each other; natural duplicates within a round stay).

Planted near-duplicates: every ``PLANT_EVERY``-th document gets a copy in which words are changed so
that the shingle Jaccard lands near a target drawn from [0.5, 1] (one copy in ten is exact). The true
Jaccard of every planted pair (``stages.dedupe.minhash.shingles``, 5-grams) is stored with the pair,
so benchmarks score F1 at J >= 0.8 on the planted pairs without recomputing it.

Written as ``FILES`` JSONL files (``{"id", "text"}``, documents shuffled) plus ``meta.json`` under
``<cache>/real-<mb>mb-v1/`` (default cache ``/tmp/seedline-bench-cache``); ``meta.json`` is written last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ is None:  # run as a script: the repository root on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

CACHE = Path("/tmp/seedline-bench-cache")
VERSION = "v1"
MAX_CHARS = 500_000
PLANT_EVERY = 20
FILES = 16
NGRAM = 5


@dataclass(frozen=True)
class Corpus:
    """A built corpus: its files' glob, size, and planted pairs ``(original id, copy id, Jaccard)``."""

    root: Path
    docs: int
    mb: float
    planted: list[tuple[str, str, float]]

    @property
    def glob(self) -> str:
        return str(self.root / "part-*.jsonl")

    @property
    def files(self) -> list[Path]:
        return sorted(self.root.glob("part-*.jsonl"))

    def texts(self) -> Iterator[tuple[str, str]]:
        """``(id, text)`` of every document, file by file."""
        for p in self.files:
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    rec = json.loads(line)
                    yield rec["id"], rec["text"]


def _source_files() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["purelib"]), Path(paths["stdlib"])]
    seen: set[Path] = set()
    out = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            real = p.resolve()
            if real not in seen and p.is_file():
                seen.add(real)
                out.append(p)
    return out


def _pydoc_pages() -> list[str]:
    from pipeline.example_data import collect_members

    return [m.page for m in collect_members()]


def base_documents() -> Iterator[tuple[str, str]]:
    """``(id, text)`` of this machine's real documents, in a fixed order."""
    for p in _source_files():
        text = p.read_text(encoding="utf-8", errors="replace")[:MAX_CHARS]
        if text.strip():
            yield f"src:{p}", text
    for i, page in enumerate(_pydoc_pages()):
        yield f"pydoc:{i}", page[:MAX_CHARS]


def _round(text: str, r: int) -> str:
    """Round ``r``'s variant: every fourth word gets the round number appended (whitespace kept)."""
    if r == 0:
        return text
    words = text.split(" ")
    for k in range(0, len(words), 4):
        if words[k]:
            words[k] = f"{words[k]}{r}"
    return " ".join(words)


def _mutated(text: str, target: float, rng: random.Random) -> str:
    """A copy whose shingle Jaccard with ``text`` is about ``target`` (each changed word ends ~NGRAM
    shingles)."""
    words = text.split(" ")
    slots = [k for k, w in enumerate(words) if w.strip()]
    n_sh = max(1, len(slots) - NGRAM + 1)
    m = int(round(n_sh * (1 - target) / (NGRAM * (1 + target))))
    for k in rng.sample(slots, min(m, len(slots))):
        words[k] = words[k] + "~"
    return " ".join(words)


def _jaccard(a: str, b: str) -> float:
    from stages.dedupe.minhash import shingles

    sa, sb = set(shingles(a, NGRAM)), set(shingles(b, NGRAM))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _collect(max_bytes: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str, float]]]:
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []
    planted: list[tuple[str, str, float]] = []
    total, r = 0, 0
    while total < max_bytes:
        for i, (doc_id, text) in enumerate(base_documents()):
            text = _round(text, r)
            doc_id = f"{doc_id}#{r}"
            docs.append((doc_id, text))
            total += len(text.encode("utf-8"))
            if i % PLANT_EVERY == PLANT_EVERY - 1:
                target = 1.0 if rng.random() < 0.1 else rng.uniform(0.5, 1.0)
                copy = text if target == 1.0 else _mutated(text, target, rng)
                docs.append((f"{doc_id}~copy", copy))
                planted.append((doc_id, f"{doc_id}~copy", _jaccard(text, copy)))
                total += len(copy.encode("utf-8"))
            if total >= max_bytes:
                break
        r += 1
    rng.shuffle(docs)  # copies land anywhere, also before their original
    return docs, planted


def real_corpus(mb: float, cache: Path | str | None = None, seed: int = 0) -> Corpus:
    """The corpus of ``mb`` MB (UTF-8 bytes of text), built on first use under ``cache``."""
    root = Path(cache or CACHE) / f"real-{mb:g}mb-{VERSION}"
    meta_path = root / "meta.json"
    if not meta_path.exists():
        docs, planted = _collect(int(mb * 1e6), seed)
        root.mkdir(parents=True, exist_ok=True)
        for f in range(FILES):
            tmp = root / f"part-{f:03d}.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                for doc_id, text in docs[f::FILES]:
                    fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
            tmp.rename(root / f"part-{f:03d}.jsonl")
        meta = {"docs": len(docs), "mb": sum(p.stat().st_size for p in root.glob("part-*.jsonl")) / 1e6,
                "planted": planted}
        tmp = root / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.rename(meta_path)
    meta = json.loads(meta_path.read_text())
    return Corpus(root, meta["docs"], meta["mb"], [tuple(p) for p in meta["planted"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=300.0)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    c = real_corpus(args.mb, args.cache)
    n_true = sum(j >= 0.8 for _, _, j in c.planted)
    print(f"corpus {c.root}: {c.docs} documents, {c.mb:.1f} MB JSONL, {len(c.planted)} planted copies "
          f"({n_true} at J >= 0.8)")


if __name__ == "__main__":
    main()
