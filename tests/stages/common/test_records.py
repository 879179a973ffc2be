"""The shared record reader: every good record comes out, every bad one is quarantined with a reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.errors import ConfigError
from stages.common.records import RecordReader, expand_inputs


def _read(path, **kw):
    reader = RecordReader(str(path), **kw)
    return [r for r in reader], reader


def _malformed_lines() -> tuple[list[bytes], dict[int, str]]:
    """Lines of a JSONL file and the expected reject reason (by prefix) of each bad line."""
    good = lambda i: json.dumps({"text": f"document number {i}", "n": i}).encode()  # noqa: E731
    lines = [
        good(1),
        b'{"text": "unterminated',                       # 2 bad JSON
        b'{"text": "caf\xe9 au lait"}',                   # 3 latin-1 byte: bad UTF-8
        json.dumps({"body": "no text field"}).encode(),  # 4 missing field
        json.dumps({"text": 42}).encode(),               # 5 non-string
        json.dumps({"text": None}).encode(),             # 6 null
        json.dumps({"text": ""}).encode(),               # 7 empty
        json.dumps({"text": "  \n\t "}).encode(),        # 8 blank
        b"[1, 2, 3]",                                    # 9 not an object
        b'{"text": "lone \\ud800 surrogate"}',           # 10 not valid Unicode
        b"",                                             # 11 blank line: not a record
        good(12),
        json.dumps({"text": "x" * (10 << 20), "big": True}).encode(),  # 13: a 10 MB document
        good(14),
    ]
    bad = {2: "invalid JSON", 3: "invalid UTF-8", 4: "missing field 'text'", 5: "field 'text' is int",
           6: "field 'text' is null", 7: "field 'text' is empty", 8: "field 'text' is empty",
           9: "not a JSON object", 10: "string with an unpaired surrogate"}
    return lines, bad


def test_malformed_jsonl_keeps_every_good_record_and_rejects_each_bad_one(tmp_path):
    lines, bad = _malformed_lines()
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline at the end: the last record still counts
    records, reader = _read(path, id_prefix="in.jsonl")
    assert [r.line for r in records] == [1, 12, 13, 14]
    assert [r.id for r in records] == ["in.jsonl:1", "in.jsonl:12", "in.jsonl:13", "in.jsonl:14"]
    assert len(records[2].text) == 10 << 20 and records[2].fields["big"] is True
    got = {r.line: r.reason for r in reader.rejects}
    assert set(got) == set(bad)
    for line, prefix in bad.items():
        assert got[line].startswith(prefix), (line, got[line])
    assert all(r.file == str(path) for r in reader.rejects)
    assert reader.lines == 13 and reader.good == 4


def test_truncated_gzip_keeps_records_before_the_damage(tmp_path):
    records = [json.dumps({"text": f"doc {i} " + "word " * 50}) for i in range(2000)]
    blob = gzip.compress(("\n".join(records) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    got, reader = _read(path)
    assert 0 < len(got) < 2000
    assert [r.text for r in got] == [json.loads(x)["text"] for x in records[: len(got)]]
    # The partial last line is rejected as bad JSON, then the truncation itself is reported.
    assert reader.rejects[-1].reason.startswith("truncated gzip stream")
    assert reader.lines == len(got) + len(reader.rejects)


def test_zstd_concatenated_gzip_and_parquet(tmp_path):
    rows = [{"text": f"doc {i}", "k": i} for i in range(10)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body[:40]) + gzip.compress(body[40:]))
    pq.write_table(pa.table({"text": [r["text"] for r in rows] + [None], "k": list(range(11))}),
                   tmp_path / "c.parquet")
    for name in ("a.jsonl.zst", "b.jsonl.gz"):
        got, reader = _read(tmp_path / name)
        assert [r.fields for r in got] == rows and not reader.rejects
    got, reader = _read(tmp_path / "c.parquet")
    assert [r.fields["k"] for r in got] == list(range(10))
    assert [(r.line, r.reason) for r in reader.rejects] == [(11, "field 'text' is null, not a string")]


def test_id_field_and_expand_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x.jsonl").write_text(
        '{"text": "a", "doc": "A1"}\n{"text": "b", "doc": 7}\n{"text": "c"}\n{"text": "d", "doc": [1]}\n')
    files = expand_inputs([str(tmp_path / "d" / "**" / "*.jsonl"), str(tmp_path / "d" / "sub" / "x.jsonl")])
    assert [(f.index, f.rel) for f in files] == [(0, "sub/x.jsonl")]
    got, reader = _read(files[0].path, id_field="doc")
    assert [r.id for r in got] == ["A1", "7"]
    assert [r.reason for r in reader.rejects] == ["id field 'doc' is missing",
                                                  "id field 'doc' is list (need a string or integer)"]
    with pytest.raises(ConfigError, match="no input file matches"):
        expand_inputs(str(tmp_path / "nothing-*.jsonl"))
