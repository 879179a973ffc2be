"""Where the tokenize stage keeps things.

Outputs (the cross-stage contract): ``tokenizer/`` (a HF fast-tokenizer directory),
``train/part-NNNNN.arrow``, ``val/part-NNNNN.arrow``, ``manifest.json``, ``stats.json`` (written last)
and ``rejects/NNNNN.jsonl`` for bad input records. Intermediates and completion markers live under
``work/``: every step writes its files first and its marker (a small JSON of the step's stats) last.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import storage

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Layout:
    """Paths inside the stage directory ``out``."""

    out: str

    def p(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    # work/: intermediates and markers
    @property
    def plan(self) -> str:
        return self.p("work", "plan.json")

    @property
    def tokenizer_done(self) -> str:
        return self.p("work", "tokenizer.json")

    def encoded(self, source: int, split: str) -> str:
        """Documents of one input file and split, encoded (one list of token ids per document)."""
        return self.p("work", "enc", f"{source:05d}-{split}.arrow")

    def encode_done(self, source: int) -> str:
        return self.p("work", "enc", f"{source:05d}.json")

    def pack_done(self, split: str, shard: int) -> str:
        return self.p("work", "pack", split, f"{shard:05d}.json")

    # outputs
    @property
    def tokenizer_dir(self) -> str:
        return self.p("tokenizer")

    def part_name(self, split: str, shard: int) -> str:
        """A shard's path relative to the stage directory (as listed in the manifest)."""
        return f"{split}/part-{shard:05d}.arrow"

    def part(self, split: str, shard: int) -> str:
        return self.p(self.part_name(split, shard))

    def rejects(self, source: int) -> str:
        return self.p("rejects", f"{source:05d}.jsonl")

    @property
    def manifest(self) -> str:
        return self.p("manifest.json")

    @property
    def stats(self) -> str:
        return self.p("stats.json")
