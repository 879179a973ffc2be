"""Without ``id_field`` a record's own ``id`` is its id (the user's ids survive, not renamed input_id);
records without one get ``<file>:<line>``; an unusable ``id`` is quarantined with the reason."""

from __future__ import annotations

import json

from stages.common.records import RecordReader
from stages.dedupe.tables import docs_table


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_own_id_is_used_without_id_field(tmp_path):
    path = _write(tmp_path / "in.jsonl", [
        {"id": "a-1", "text": "one"}, {"id": 42, "text": "two"}, {"text": "three"},
        {"id": None, "text": "four"}, {"id": {"x": 1}, "text": "five"}, {"id": True, "text": "six"},
        {"id": "", "text": "seven"},
    ])
    reader = RecordReader(path)
    got = [(r.id, r.text) for r in reader]
    assert got == [("a-1", "one"), ("42", "two"), ("in.jsonl:3", "three"), ("in.jsonl:4", "four")]
    assert [(r.line, r.reason) for r in reader.rejects] == [
        (5, "id field 'id' is dict (need a string or integer)"),
        (6, "id field 'id' is bool (need a string or integer)"),
        (7, "id field 'id' is empty"),
    ]


def test_configured_id_field_wins_and_the_own_id_is_passed_through(tmp_path):
    rows = [{"doc": "d1", "id": "mine", "text": "one", "lang": "en"}]
    path = _write(tmp_path / "in.jsonl", rows)
    recs = list(RecordReader(path, id_field="doc"))
    assert [r.id for r in recs] == ["d1"]
    table = docs_table([0], [r.id for r in recs], [r.text for r in recs], [r.fields for r in recs],
                       "text", "doc")
    assert table.column_names == ["uid", "id", "text", "input_id", "lang"]
    assert table.to_pylist()[0] | {"uid": 0} == {"uid": 0, "id": "d1", "text": "one", "input_id": "mine",
                                                 "lang": "en"}


def test_dedupe_documents_keep_the_users_id_column(tmp_path):
    rows = [{"id": 7, "text": "one", "source": "x"}, {"text": "two", "source": "y"}]
    recs = list(RecordReader(_write(tmp_path / "in.jsonl", rows)))
    table = docs_table([0, 1], [r.id for r in recs], [r.text for r in recs], [r.fields for r in recs],
                       "text", None)
    assert table.column_names == ["uid", "id", "text", "source"]
    assert table.column("id").to_pylist() == ["7", "in.jsonl:2"]
