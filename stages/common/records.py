"""Reading documents from JSONL, JSONL.gz, JSONL.zst and Parquet files, quarantining bad records.

Two entry points, shared by the data stages (dedupe, tokenize):

``expand_inputs(patterns)``
    Expands globs (local paths or fsspec URLs, through ``pipeline.storage.glob``) into a sorted list of
    ``InputFile``. Each file has a stable short name, ``rel``: its path relative to the fixed
    (glob-free) directory of the pattern that matched it, used in generated document ids.

``RecordReader(path, text_field=..., id_field=..., id_prefix=...)``
    Iterates one file and yields a ``Record`` for every good document. A bad one becomes a ``Reject``
    (file, line, reason, snippet) handed to ``on_reject`` (default: appended to ``reader.rejects``);
    nothing is dropped silently and nothing bad is fatal. Bad means: a line that is not UTF-8 or not
    JSON, not a JSON object, lacks the text field, has a non-string or blank text, holds a string that
    is not valid Unicode (an unpaired surrogate escape), or has an unusable id. A truncated or corrupt
    compressed stream keeps every record read before the damage and adds one reject for the damage.
    Blank lines are not records. Lines are numbered from 1 (Parquet rows too). Without ``id_field``, a
    record's own ``id`` field (a string or integer) is its id, so the user's ids survive; a record without
    one (or with ``null``) gets the stable id ``"<id_prefix>:<line>"``. Reading is streaming and linear in
    the input size, however long a single line is.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipeline import storage
from pipeline.errors import ConfigError

CHUNK_BYTES = 4 << 20
SNIPPET_CHARS = 200
DEFAULT_ID_FIELD = "id"  # used, when present, if no id_field is configured
_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class InputFile:
    """One input file: ``index`` is its position in the sorted input list, ``rel`` its stable name."""

    index: int
    path: str
    rel: str

    @property
    def format(self) -> str:
        return file_format(self.path)


class Record(NamedTuple):
    """A good document. ``fields`` is the whole input object (text and id fields included)."""

    line: int
    id: str
    text: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Reject:
    """A quarantined record: where it was and why it was refused."""

    file: str
    line: int
    reason: str
    snippet: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "snippet": self.snippet}


def file_format(path: str) -> str:
    """``jsonl``, ``jsonl.gz``, ``jsonl.zst`` or ``parquet``, from the file name."""
    name = path.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".gz", "jsonl.gz"), (".zst", "jsonl.zst"),
                        (".zstd", "jsonl.zst")):
        if name.endswith(suffix):
            return fmt
    return "jsonl"


def _static_dir(pattern: str) -> str:
    m = _GLOB_CHARS.search(pattern)
    if m is None:
        return pattern.rsplit("/", 1)[0] if "/" in pattern else ""
    return pattern[: m.start()].rsplit("/", 1)[0] if "/" in pattern[: m.start()] else ""


def expand_inputs(patterns: str | list[str], field_path: str = "input") -> list[InputFile]:
    """Sorted, de-duplicated input files matched by ``patterns``.

    Raises ``ConfigError`` naming ``field_path`` when a pattern matches no file.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    found: dict[str, str] = {}
    for pat in pats:
        matches = [m for m in storage.glob(pat) if not _is_dir(m)]
        if not matches:
            raise ConfigError(field_path, f"no input file matches {pat!r}")
        base = _static_dir(pat)
        for m in matches:
            rel = m[len(base):].lstrip("/") if base and m.startswith(base) else m.rsplit("/", 1)[-1]
            found.setdefault(m, rel)
    return [InputFile(i, p, found[p]) for i, p in enumerate(sorted(found))]


def _is_dir(path: str) -> bool:
    p = storage.local(path)
    return p.is_dir() if p is not None else False


class _Damaged(Exception):
    """The compressed stream ended early or is corrupt; everything before it was delivered."""


def _raw_chunks(path: str) -> Iterator[bytes]:
    with storage.open_read(path, "rb") as f:
        while True:
            data = f.read(CHUNK_BYTES)
            if not data:
                return
            yield data


def _gzip_chunks(path: str) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=31)
    fed = False
    try:
        for data in _raw_chunks(path):
            while data:
                fed = True
                out = d.decompress(data)
                if out:
                    yield out
                if d.eof:  # another gzip member may follow (concatenated .gz files)
                    data, d, fed = d.unused_data, zlib.decompressobj(wbits=31), False
                else:
                    data = b""
    except zlib.error as e:
        raise _Damaged(f"corrupt gzip stream: {e}") from None
    if fed and not d.eof:
        raise _Damaged("truncated gzip stream (compressed data ends before the end-of-stream marker)")


def _zstd_chunks(path: str) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    d, fed = dctx.decompressobj(), False
    try:
        for data in _raw_chunks(path):
            while data:
                fed = True
                out = d.decompress(data)
                if out:
                    yield out
                if d.eof:  # another frame may follow
                    data, d, fed = d.unused_data, dctx.decompressobj(), False
                else:
                    data = b""
    except zstandard.ZstdError as e:
        raise _Damaged(f"corrupt zstd stream: {e}") from None
    if fed and not d.eof:
        raise _Damaged("truncated zstd stream (compressed data ends before the end of the frame)")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines without the newline. A long line is assembled from a list of
    pieces joined once, so reading stays linear in its length."""
    pending: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        pending.append(parts[0])
        yield b"".join(pending)
        yield from parts[1:-1]
        pending = [parts[-1]] if parts[-1] else []
    if pending:
        yield b"".join(pending)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


@dataclass
class RecordReader:
    """Iterate the good records of one file; see the module docstring for what is rejected.

    ``on_reject`` receives each ``Reject``; by default they are collected in ``rejects``. After
    iteration, ``lines`` is the number of records seen (good and bad) and ``good`` the number yielded.
    """

    path: str
    text_field: str = "text"
    id_field: str | None = None
    id_prefix: str | None = None
    on_reject: Callable[[Reject], None] | None = None
    rejects: list[Reject] = field(default_factory=list)
    lines: int = 0
    good: int = 0

    def __post_init__(self) -> None:
        if self.id_prefix is None:
            self.id_prefix = self.path.rsplit("/", 1)[-1]

    def __iter__(self) -> Iterator[Record]:
        fmt = file_format(self.path)
        if fmt == "parquet":
            yield from self._parquet()
            return
        chunks = {"jsonl": _raw_chunks, "jsonl.gz": _gzip_chunks, "jsonl.zst": _zstd_chunks}[fmt](self.path)
        line_no = 0
        try:
            for raw in _lines(chunks):
                line_no += 1
                if not raw or raw.isspace():  # blank line: not a record
                    continue
                self.lines += 1
                rec = self._parse(raw, line_no)
                if rec is not None:
                    self.good += 1
                    yield rec
        except _Damaged as e:
            self.lines += 1
            self._reject(line_no + 1, f"{e}; {line_no} lines before it were read", b"")

    def _reject(self, line: int, reason: str, raw: bytes) -> None:
        snippet = raw[: SNIPPET_CHARS * 4].decode("utf-8", "replace")[:SNIPPET_CHARS]
        rej = Reject(self.path, line, reason, snippet)
        if self.on_reject is not None:
            self.on_reject(rej)
        else:
            self.rejects.append(rej)

    def _parse(self, raw: bytes, line_no: int) -> Record | None:
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._reject(line_no, f"invalid UTF-8 at byte {e.start}", raw)
            return None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            self._reject(line_no, f"invalid JSON: {e.msg} at column {e.colno}", raw)
            return None
        except RecursionError:
            self._reject(line_no, "invalid JSON: nested too deeply", raw)
            return None
        if not isinstance(obj, dict):
            self._reject(line_no, f"not a JSON object ({_type_name(obj)})", raw)
            return None
        if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) and not _valid_unicode(obj):
            self._reject(line_no, "string with an unpaired surrogate (not valid Unicode)", raw)
            return None
        return self._record(obj, line_no, raw)

    def _record(self, obj: dict[str, Any], line_no: int, raw: bytes) -> Record | None:
        tf = self.text_field
        if tf not in obj:
            self._reject(line_no, f"missing field {tf!r}", raw)
            return None
        text = obj[tf]
        if not isinstance(text, str):
            self._reject(line_no, f"field {tf!r} is {_type_name(text)}, not a string", raw)
            return None
        if not text or text.isspace():
            self._reject(line_no, f"field {tf!r} is empty", raw)
            return None
        id_field = self.id_field or DEFAULT_ID_FIELD
        if self.id_field is None and obj.get(id_field) is None:
            return Record(line_no, f"{self.id_prefix}:{line_no}", text, obj)
        doc_id = obj.get(id_field)
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
            what = ("missing" if id_field not in obj else "empty" if doc_id == ""
                    else f"{_type_name(doc_id)} (need a string or integer)")
            self._reject(line_no, f"id field {id_field!r} is {what}", raw)
            return None
        return Record(line_no, str(doc_id), text, obj)

    def _parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        line_no = 0
        try:
            with storage.open_read(self.path, "rb") as f:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=4096):
                    for obj in batch.to_pylist():
                        line_no += 1
                        self.lines += 1
                        rec = self._record(obj, line_no, b"")
                        if rec is not None:
                            self.good += 1
                            yield rec
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) / ArrowIOError
            self.lines += 1
            self._reject(line_no + 1, f"unreadable Parquet ({type(e).__name__}: {e}); "
                                      f"{line_no} rows before it were read", b"")


def _valid_unicode(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
