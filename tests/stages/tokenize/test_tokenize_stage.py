"""The tokenize stage end to end on a real local Ray (one Ray per module) and real HF tokenizers."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from pipeline.errors import ConfigError
from pipeline.stage import Progress, StageContext, handle
from pipeline.tracking import NullTracker
from stages.tokenize.config import TokenizeConfig
from stages.tokenize.run import KILL_ENV, run
from stages.tokenize.sources import is_val, val_threshold

REPO = Path(__file__).resolve().parents[3]
CONFIG = {"tokenizer": {"train": {"vocab_size": 400, "sample_docs": 150}}, "seq_len": 32,
          "val_fraction": 0.2, "rows_per_shard": 50, "max_chunk_chars": 1000}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 (moto) for the module, in the environment before Ray starts so workers see it too."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_address(s3_endpoint):
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ctx(out: Path | str, address: str, dedupe_dir: Path | str | None = None) -> StageContext:
    inputs = {"documents": [handle("dedupe", str(dedupe_dir), "documents")]} if dedupe_dir else {}
    return StageContext(name="tokenize", out_dir=str(out), run_dir=str(out).rsplit("/", 1)[0],
                        fingerprint="test",
                        inputs=inputs, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("test"), ray_address=address)


def _documents(n: int, seed: int) -> list[str]:
    """Distinct documents: words, punctuation, newlines, non-Latin scripts, emoji; a few special cases."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
             for _ in range(300)] + ["über", "naïve", "東京", "данные", "🙂", "ε=mc²", "\t", "  "]
    docs = []
    for i in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 120))]
        sep = rng.choice([" ", " ", "\n", ", "])
        docs.append(f"doc {i}: " + sep.join(words))
    docs[3] = "a document that mentions <|endoftext|> and <|pad|> as plain text"
    docs[7] = " ".join(rng.choice(vocab) for _ in range(2500))  # ~12k chars: cut into pieces
    docs[11] = "x" * 3500 + " tail"  # a long run without whitespace: cut mid-run
    docs[13] = "   leading spaces and trailing newline\n\n"
    return docs


def _write_dedupe_output(root: Path, docs: list[str]) -> Path:
    """A dedupe stage directory: ``data/part-*.parquet`` with ``id``, ``text`` and a passed-through field."""
    data = root / "data"
    data.mkdir(parents=True)
    bounds = [0, 50, 51, 130, len(docs)]  # uneven parts, one with a single document
    for p in range(len(bounds) - 1):
        part = list(range(bounds[p], bounds[p + 1]))
        pq.write_table(pa.table({"id": [f"d{i}" for i in part], "text": [docs[i] for i in part],
                                 "lang": ["xx"] * len(part)}), data / f"part-{p:05d}.parquet")
    return root


def _outputs(out: Path) -> dict[str, bytes]:
    keep = [p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "work"]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(keep)}


def _shard_rows(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """All rows of a split: tokens (rows, L+1), lengths, document starts per row."""
    manifest = json.loads((out / "manifest.json").read_text())
    toks, lens, starts = [], [], []
    for sh in manifest["splits"][split]["shards"]:
        t = ipc.open_file(pa.memory_map(str(out / sh["path"]))).read_all()
        toks.append(np.asarray(t["tokens"].combine_chunks().flatten()).reshape(t.num_rows, -1))
        lens.append(np.asarray(t["length"]))
        starts += [np.asarray(s, dtype=np.int64) for s in t["doc_starts"].to_pylist()]
    if not toks:
        return np.empty((0, manifest["row_len"]), np.int64), np.empty(0, np.int64), []
    return np.concatenate(toks), np.concatenate(lens), starts


def _stream(out: Path, split: str) -> np.ndarray:
    """A split's token stream: rows overlap by one token, so each row after the first adds row[1:length]."""
    rows, lens, _ = _shard_rows(out, split)
    parts = [rows[r, (1 if r else 0): lens[r]] for r in range(len(rows))]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _decode_docs(out: Path, split: str) -> list[str]:
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eot = json.loads((out / "manifest.json").read_text())["special_token_ids"]["eot"]
    stream = _stream(out, split).tolist()
    assert not stream or stream[-1] == eot
    docs, cur = [], []
    for t in stream:
        if t == eot:
            docs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
        else:
            cur.append(t)
    return docs


@pytest.fixture(scope="module")
def packed(tmp_path_factory, ray_address):
    root = tmp_path_factory.mktemp("tok")
    docs = _documents(200, seed=3)
    dedupe = _write_dedupe_output(root / "dedupe", docs)
    cfg = TokenizeConfig(**CONFIG)
    stats = run(cfg, _ctx(root / "out", ray_address, dedupe))
    return {"docs": docs, "dedupe": dedupe, "cfg": cfg, "out": root / "out", "stats": stats}


def test_round_trip_every_document_in_exactly_one_split(packed):
    out, docs = packed["out"], packed["docs"]
    train, val = _decode_docs(out, "train"), _decode_docs(out, "val")
    # Each split's stream is its documents, in input order, each followed by end-of-text, decoded exactly.
    want_val = [d for i, d in enumerate(docs) if is_val(f"d{i}", 0, val_threshold(0.2))]
    assert val == want_val and train == [d for d in docs if d not in set(want_val)]
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 0.1 < len(val) / len(docs) < 0.3
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    text = tok.decode(_stream(out, "train").tolist(), skip_special_tokens=False)
    assert text == "".join(d + "<|endoftext|>" for d in train)
    s = packed["stats"]
    assert (s["docs_in"], s["docs_rejected"]) == (200, 0)
    assert (s["docs_train"], s["docs_val"]) == (len(train), len(val))
    assert s["docs_cut"] == 2  # the two long documents were cut before encoding, and still round-trip


def test_manifest_counts_and_hashes_match_the_shards(packed):
    out, stats = packed["out"], packed["stats"]
    m = json.loads((out / "manifest.json").read_text())
    assert (m["seq_len"], m["row_len"], m["dtype"], m["vocab_size"]) == (32, 33, "uint16", 400)
    assert m["special_token_ids"] == {"eot": 0, "pad": 1, "im_start": 2, "im_end": 3}
    tok_json = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert m["tokenizer_sha256"] == hashlib.sha256(tok_json).hexdigest()
    assert json.loads((out / "stats.json").read_text()) == stats
    assert not list((out / "work" / "enc").glob("*.arrow"))  # intermediates removed once done
    for split in ("train", "val"):
        sp = m["splits"][split]
        files = sorted((out / split).glob("part-*.arrow"))
        assert [str(f.relative_to(out)) for f in files] == [sh["path"] for sh in sp["shards"]]
        for sh in sp["shards"]:
            data = (out / sh["path"]).read_bytes()
            table = ipc.open_file(pa.py_buffer(data)).read_all()
            assert table.schema.field("tokens").type == pa.list_(pa.field("item", pa.uint16(), False), 33)
            assert (sh["rows"], sh["bytes"]) == (table.num_rows, len(data))
            assert sh["tokens"] == sum(table["length"].to_pylist())
            assert sh["sha256"] == hashlib.sha256(data).hexdigest()
        assert all(sh["rows"] == 50 for sh in sp["shards"][:-1]) and 0 < sp["shards"][-1]["rows"] <= 50
        rows, lens, starts = _shard_rows(out, split)
        stream = _stream(out, split)
        assert sp["rows"] == len(rows) == -(-(len(stream) - 1) // 32) and sp["stream_tokens"] == len(stream)
        assert sp["docs"] == stats[f"docs_{split}"] and sp["tokens"] == int(lens.sum())
        assert stats[f"pad_tokens_{split}"] == len(rows) * 33 - int(lens.sum())
        assert (rows[-1, lens[-1]:] == m["special_token_ids"]["pad"]).all() and (lens[:-1] == 33).all()
        # Document starts: stream position 0 and every position after an end-of-text, per row.
        eot_pos = np.flatnonzero(stream == m["special_token_ids"]["eot"])
        doc_starts = np.concatenate([[0], eot_pos[:-1] + 1])
        got = np.concatenate([r * 32 + s for r, s in enumerate(starts)])
        assert np.array_equal(got, doc_starts) and all(((s >= 0) & (s < 32)).all() for s in starts)


def test_saved_tokenizer_loads_in_transformers(packed):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = packed["out"]
    m = json.loads((out / "manifest.json").read_text())
    ids = m["special_token_ids"]
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        hf = cls.from_pretrained(str(out / "tokenizer"))
        assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (ids["eot"], ids["eot"], ids["pad"])
        assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [ids["im_start"], ids["im_end"]]
        assert len(hf) == m["vocab_size"]
        text = packed["docs"][20]
        assert hf.decode(hf(text)["input_ids"]) == text
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


_RESUME_SCRIPT = """
import json, logging, sys
from pathlib import Path
from pipeline.stage import Progress, StageContext, handle
from pipeline.tracking import NullTracker
from stages.tokenize.config import TokenizeConfig
from stages.tokenize.run import run
out, dedupe, address, cfg = sys.argv[1:5]
ctx = StageContext(name="tokenize", out_dir=out, run_dir=str(Path(out).parent), fingerprint="t",
                   inputs={"documents": [handle("dedupe", dedupe, "documents")]}, tracker=NullTracker(),
                   progress=Progress(None), logger=logging.getLogger("t"), ray_address=address)
run(TokenizeConfig(**json.loads(cfg), num_workers=1, batch_chars=3000), ctx)
"""


def test_killed_run_resumes_to_identical_output(packed, ray_address, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = [sys.executable, "-c", _RESUME_SCRIPT, str(out), str(packed["dedupe"]), ray_address,
           json.dumps(CONFIG)]
    # The first run trains the tokenizer in a fresh process and dies after one input file is encoded;
    # the second dies after two shards are packed; the third finishes. Other batch sizes and one worker.
    proc = subprocess.run(cmd, env={**env, KILL_ENV: "encode:1"}, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 75, proc.stderr.decode()[-3000:]
    assert (out / "work" / "tokenizer.json").exists()
    assert len(list((out / "work" / "enc").glob("*.json"))) == 1
    proc = subprocess.run(cmd, env={**env, KILL_ENV: "pack:2"}, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 75, proc.stderr.decode()[-3000:]
    assert len(list((out / "work" / "pack").rglob("*.json"))) == 2 and not (out / "manifest.json").exists()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert _outputs(out) == _outputs(packed["out"])


def test_raw_input_with_bad_records_and_a_given_tokenizer(packed, ray_address, tmp_path):
    docs = _documents(60, seed=9)
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"text": d, "key": f"k{i}"}) for i, d in enumerate(docs)]
    (src / "a.jsonl").write_text("\n".join(lines[:30] + ['{"text": "broken', json.dumps({"key": "no text"})])
                                 + "\n")
    (src / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[30:]) + "\n").encode()))
    cfg = TokenizeConfig(**{**CONFIG, "tokenizer": {"path": str(packed["out"] / "tokenizer")}},
                         input=str(src / "*"), id_field="key")
    stats = run(cfg, _ctx(tmp_path / "out", ray_address))
    out = tmp_path / "out"
    assert (stats["docs_in"], stats["docs_rejected"], stats["docs"]) == (62, 2, 60)
    rejects = [json.loads(x) for x in (out / "rejects" / "00000.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [(31, "invalid JSON"),
                                                                         (32, "missing field 'text'")]
    assert sorted(_decode_docs(out, "train") + _decode_docs(out, "val")) == sorted(docs)
    # The given tokenizer is used as is: same tokenizer.json bytes as the run that trained it.
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == \
        (packed["out"] / "tokenizer" / "tokenizer.json").read_bytes()


def test_object_store_input_and_output_give_identical_bytes(packed, ray_address, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("tok")
    for p in sorted((packed["dedupe"] / "data").iterdir()):
        fs.put_file(str(p), f"tok/dedupe/data/{p.name}")
    stats = run(packed["cfg"], _ctx("s3://tok/out", ray_address, "s3://tok/dedupe"))
    assert stats == packed["stats"]
    for name, data in _outputs(packed["out"]).items():
        assert fs.cat_file(f"tok/out/{name}") == data, name
    assert not fs.glob("tok/out/work/enc/*.arrow")


def test_config_requires_input_without_dedupe_and_refuses_it_with_dedupe():
    from pipeline.config import validate_config

    tok = {"tokenizer": {"path": "tok.json"}}
    with pytest.raises(ConfigError) as e:
        validate_config({"name": "t", "stages": {"tokenize": tok}})
    assert e.value.path == "stages.tokenize.input"
    with pytest.raises(ConfigError) as e:
        validate_config({"name": "t", "stages": {"dedupe": {"input": "x/*.jsonl"},
                                                 "tokenize": {**tok, "input": "x/*.jsonl"}}})
    assert e.value.path == "stages.tokenize.input"
    with pytest.raises(ConfigError) as e:
        validate_config({"name": "t", "stages": {"tokenize": {**tok, "input": "x", "seq_len": 0}}})
    assert e.value.path == "stages.tokenize.seq_len"
    with pytest.raises(ConfigError) as e:
        validate_config({"name": "t", "stages": {"tokenize": {"input": "x", "tokenizer": {}}}})
    assert e.value.path.startswith("stages.tokenize.tokenizer")
    cfg = validate_config({"name": "t", "stages": {"dedupe": {"input": "x/*.jsonl"}, "tokenize": tok}})
    assert cfg.stage_configs()["tokenize"].seq_len == 2048


def test_pipeline_runs_dedupe_then_tokenize(ray_address, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.runner import run_pipeline

    docs = _documents(80, seed=5)
    src = tmp_path / "corpus"
    src.mkdir()
    rows = [{"text": d} for d in docs] + [{"text": docs[0]}, {"text": docs[1].upper()}]  # two duplicates
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_config({
        "name": "tk", "workdir": str(tmp_path / "runs"), "ray": {"address": ray_address},
        "stages": {"dedupe": {"input": str(src / "*.jsonl")},
                   "tokenize": {**CONFIG, "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 50}}}},
    })
    result = run_pipeline(cfg)
    assert result.outcomes == {"dedupe": "ran", "tokenize": "ran"}
    out = Path(result.stage_dirs["tokenize"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["docs"] == 80 and stats["docs_rejected"] == 0
    assert sorted(_decode_docs(out, "train") + _decode_docs(out, "val")) == sorted(docs)
    client = MlflowClient(tracking_uri=cfg.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("tk").experiment_id],
                              filter_string="tags.`seedline.stage` = 'tokenize'")
    assert runs[0].data.metrics["tokens"] == stats["tokens"]
    assert run_pipeline(cfg).outcomes == {"dedupe": "skipped", "tokenize": "skipped"}
