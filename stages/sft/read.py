"""Reading chat records (JSONL, JSONL.gz/.zst or Parquet; local or fsspec) with quarantine.

File handling, UTF-8/JSON checks and line numbering come from ``stages.common.records``; this module
adds the chat checks of ``stages.sft.chat.to_messages``. A bad record becomes a ``Reject`` with the
reason; nothing is dropped silently and nothing bad is fatal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.common.records import Record, RecordReader, Reject, expand_inputs
from stages.sft.chat import BadRecord, Message, to_messages


@dataclass(frozen=True)
class Example:
    """A good conversation; ``id`` is ``<file name>:<line>`` (stable across runs); ``file`` and ``line``
    say where it was read (for a reject record when the length policy leaves it out)."""

    id: str
    messages: list[Message]
    file: str = ""
    line: int = 0


class ChatReader(RecordReader):
    """A ``RecordReader`` whose records are conversations instead of a text field."""

    def _record(self, obj: dict[str, Any], line_no: int, raw: bytes) -> Record | None:
        try:
            msgs = to_messages(obj)
        except BadRecord as e:
            self._reject(line_no, str(e), raw or json.dumps(obj, ensure_ascii=False).encode())
            return None
        return Record(line_no, f"{self.id_prefix}:{line_no}", "", {"messages": msgs})


def read_examples(patterns: str | list[str], field_path: str,
                  on_reject: Callable[[Reject], None]) -> tuple[list[Example], int]:
    """Every good conversation of the files matched by ``patterns`` (in file, then line order) and the
    number of records seen. Bad records go to ``on_reject``."""
    examples: list[Example] = []
    seen = 0
    for f in expand_inputs(patterns, field_path):
        reader = ChatReader(f.path, id_prefix=f.rel, on_reject=on_reject)
        examples += [Example(rec.id, rec.fields["messages"], f.path, rec.line) for rec in reader]
        seen += reader.lines
    return examples, seen


def is_val(example: Example, fraction: float) -> bool:
    """Whether an example is held out: a hash of its conversation (not its position) below ``fraction``,
    so the split does not change when files are reordered and duplicates land on the same side."""
    if fraction <= 0:
        return False
    key = json.dumps(example.messages, ensure_ascii=False, sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") < fraction * 2**64
