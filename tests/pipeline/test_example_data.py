"""`seedline example-data`: real stdlib documentation, split without leaks, well-formed sets."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_example_data_writes_every_set_without_train_val_leaks(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "pipeline", "example-data", str(out)],
                          capture_output=True, text=True, check=True)
    assert str(out) in done.stdout
    docs = [json.loads(line) for p in sorted((out / "corpus").glob("part-*.jsonl.gz"))
            for line in gzip.decompress(p.read_bytes()).decode().splitlines()]
    assert len(docs) > 1000 and {"id", "text"} <= set(docs[0])
    assert any(d["id"] == "json.dumps" and "Serialize" in d["text"] for d in docs)
    code = [json.loads(line) for p in sorted((out / "code").glob("part-*.jsonl.gz"))
            for line in gzip.decompress(p.read_bytes()).decode().splitlines()]
    assert len(code) > 50 and all(d["id"].endswith(".py") and len(d["text"]) <= 20_000 for d in code)
    assert any(d["id"] == "json.py" and "def dumps(" in d["text"] for d in code)

    train, val = _rows(out / "instruct/train.jsonl"), _rows(out / "instruct/val.jsonl")
    assert len(train) > 500 and len(val) > 30
    kinds = {("messages" in r, "prompt" in r) for r in train}
    assert kinds == {(True, False), (False, True)}
    assert any(r["messages"][0]["role"] == "system" for r in train if "messages" in r)

    def question(r):
        return r["messages"][-2]["content"] if "messages" in r else r["prompt"]

    def name(q):
        return q.split("`")[1]
    assert not {name(question(r)) for r in train} & {name(question(r)) for r in val}

    prefs = _rows(out / "prefs/train.jsonl")
    assert len(prefs) == len(train)
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    assert {type(p["prompt"]) for p in prefs} == {list, str}
    held_pairs = _rows(out / "prefs/val.jsonl")
    assert {name(p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][0]["content"])
            for p in held_pairs} == {name(question(r)) for r in val}

    mc = _rows(out / "eval/mc.jsonl")
    assert len(mc) == len(val)
    for item in mc:
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
    assert len(_rows(out / "eval/prompts.jsonl")) == 12


def _write(out: Path, cwd: Path, secret: str) -> dict[str, bytes]:
    cwd.mkdir()
    env = dict(os.environ, SEEDLINE_TEST_SECRET=secret)
    subprocess.run([sys.executable, "-m", "pipeline", "example-data", str(out)], cwd=cwd, env=env,
                   capture_output=True, check=True)
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl*"))}


def test_example_data_is_the_same_everywhere_and_holds_no_environment(tmp_path):
    # pydoc renders default values such as cgi.parse(environ=os.environ) and object addresses.
    first = _write(tmp_path / "a", tmp_path / "cwd-a", "s3cr3t-value-one")
    second = _write(tmp_path / "b", tmp_path / "cwd-b", "s3cr3t-value-two")
    assert first == second
    text = b"".join(gzip.decompress(v) if k.endswith(".gz") else v for k, v in first.items())
    assert b"s3cr3t-value" not in text and str(tmp_path).encode() not in text
    pages = b"".join(gzip.decompress(v) for k, v in first.items() if k.startswith("corpus/"))
    assert b" at 0x" not in pages  # (the code source holds repr formats such as "<%s at 0x%x>")
    # Nor this installation's paths (platform.architecture(executable=sys.executable)).
    assert sys.prefix.encode() not in text and sys.executable.encode() not in text
