"""An example the length policy leaves out is written to ``rejects/`` as a full reject record (file, line,
id, reason, snippet: the same fields as a quarantined record), not only counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from sft_helpers import records, train_tokenizer, write_jsonl

from stages.sft.prepare import DataSpec, prepare
from stages.sft.tokenizer import prepare_tokenizer


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    src = train_tokenizer(tmp_path_factory.mktemp("tok-src"))
    out = tmp_path_factory.mktemp("tok")
    prepare_tokenizer(str(src), str(out), logging.getLogger("t"))
    return (out / "tokenizer.json").read_text()


@pytest.mark.parametrize("policy, reason", [("drop", "policy: drop"), ("truncate", "no assistant token")])
def test_length_policy_drops_are_reject_records(tmp_path: Path, tokenizer_json: str, policy, reason):
    long_answer = {"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "value " * 80}]}
    long_prompt = {"messages": [{"role": "user", "content": "key " * 80},
                                {"role": "assistant", "content": "a"}]}
    rows = [*records(4, seed=3), long_prompt, long_answer, "{not json"]
    data = write_jsonl(tmp_path / "in" / "train.jsonl", rows)
    summary = prepare(DataSpec(str(data), None, 0.0, 64, True, policy), tokenizer_json, str(tmp_path / "out"))
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects" / "train.jsonl").read_text().splitlines()]
    dropped = [r for r in rejects if "max_len" in r["reason"]]
    s = summary["train"]
    assert len(dropped) == s["dropped_too_long"] + s["dropped_no_target"] >= 1
    assert len(rejects) == len(dropped) + s["quarantined"]  # the malformed line is there too
    lines = data.read_text().splitlines()
    expected = {5, 6} if policy == "drop" else {5}  # long_prompt; long_answer only when not truncated
    assert expected <= {r["line"] for r in dropped}
    for r in dropped:
        assert set(r) == {"file", "line", "id", "reason", "snippet"}
        assert r["file"] == str(data) and reason in r["reason"] and r["id"].endswith(f":{r['line']}")
        source = json.loads(lines[r["line"] - 1])  # file and line point at the record itself
        first_user = next(m["content"] for m in source["messages"] if m["role"] == "user") \
            if "messages" in source else source["prompt"]
        assert json.dumps(first_user)[1:20] in r["snippet"]
