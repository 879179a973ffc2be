"""What the tokenize stage reads, and the per-document rules applied while reading.

Input is the dedupe stage's ``data/part-*.parquet`` (``id`` and ``text`` columns) when the pipeline has
dedupe, else the stage's own ``input`` glob(s) (JSONL, JSONL.gz, JSONL.zst or Parquet), both read through
``stages.common.records`` so that bad records are quarantined the same way everywhere.

Per document: its split is a seeded hash of its id (stable whatever the file order or parallelism); a
long text is cut at whitespace into pieces of bounded length before encoding, because some tokenizer
normalizers and pre-tokenizers are super-linear in the length of one input.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import xxhash

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.common.records import InputFile, RecordReader, Reject, expand_inputs
from stages.tokenize.config import TokenizeConfig

# The last whitespace character that is followed by a non-whitespace one: with GPT-2-style byte-level
# pre-tokenization (" ?word", whitespace runs minus their last character) a cut there is a piece boundary,
# so pieces encode exactly as the whole text would. Greedy ".*" makes the match the last one, in linear time.
_LAST_CUT = re.compile(r".*\s(?=\S)", re.DOTALL)


@dataclass(frozen=True)
class Sources:
    """The files to read and the record fields to read from them."""

    files: list[InputFile]
    text_field: str
    id_field: str | None
    origin: str  # "dedupe" or "input"

    def reader(self, f: InputFile, rejects: list[Reject]) -> RecordReader:
        return RecordReader(f.path, self.text_field, self.id_field, f.rel, on_reject=rejects.append)


def find_sources(config: TokenizeConfig, ctx: StageContext) -> Sources:
    """The bound upstream stage's documents (dedupe or filter), else ``config.input``."""
    up = ctx.input("documents")
    if up is not None:
        paths = storage.glob(storage.join(up.path, "part-*.parquet"))
        files = [InputFile(i, p, p.rsplit("/", 1)[-1]) for i, p in enumerate(paths)]
        return Sources(files, "text", "id", up.type)
    if not config.input:
        raise ConfigError("stages.tokenize.input", "required when the pipeline has no dedupe stage")
    return Sources(expand_inputs(config.input, "stages.tokenize.input"), config.text_field, config.id_field,
                   "input")


def val_threshold(val_fraction: float) -> int:
    """Documents whose id hash is below this go to the validation split."""
    return int(val_fraction * 2**64)


def is_val(doc_id: str, seed: int, threshold: int) -> bool:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed) < threshold


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, in linear time.

    Each cut is at the last whitespace-before-non-whitespace in the second half of the window, or (text
    with no such place, e.g. a long run without spaces) exactly at the window's end. The pieces joined
    are ``text``.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > max_chars:
        lo, end = start + max_chars // 2, start + max_chars
        m = _LAST_CUT.match(text, lo, end + 1)  # the cut char is text[m.end() - 1], followed by non-space
        cut = m.end() - 1 if m is not None and m.end() - 1 > lo else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def sample_key(doc_id: str, seed: int) -> int:
    """Rank of a document in the tokenizer-training sample (smallest keys are taken)."""
    return xxhash.xxh64_intdigest(b"sample:" + doc_id.encode("utf-8"), seed=seed)


def sample_file(sources: Sources, f: InputFile, k: int, seed: int) -> list[tuple[int, int, int, str]]:
    """The ``k`` documents of ``f`` with the smallest sample keys: ``(key, file index, line, text)``.

    Bad records are skipped here (the encode step quarantines them); memory holds at most ``k`` texts.
    """
    heap: list[tuple[int, int, str]] = []  # (-key, -line, text): a max-heap on (key, line)
    for rec in sources.reader(f, []):
        item = (-sample_key(rec.id, seed), -rec.line, rec.text)
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    return sorted((-key, f.index, -neg_line, text) for key, neg_line, text in heap)
