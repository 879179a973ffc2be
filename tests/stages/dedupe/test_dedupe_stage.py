"""The dedupe stage end to end on a real local Ray (one Ray per module)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.dedupe.components import components_local, components_ray
from stages.dedupe.config import DedupeConfig
from stages.dedupe.minhash import shingles
from stages.dedupe.run import KILL_ENV, run

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 (moto) for the module; its settings are in the environment before Ray starts, so
    Ray workers see them too."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in env.items():
            mp.setenv(k, v)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_address(s3_endpoint):
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ctx(out: Path, address: str | None = None) -> StageContext:
    return StageContext(name="dedupe", out_dir=str(out), run_dir=str(out.parent), fingerprint="test",
                        inputs={}, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("test"), ray_address=address)


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
            for _ in range(n)]


def _jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a, 5)), set(shingles(b, 5))
    return len(sa & sb) / len(sa | sb)


def _planted(root: Path) -> dict:
    """Originals, then exact copies (case/space changed), near copies (J > 0.85), far copies (J < 0.5),
    spread over a JSONL, a JSONL.gz and a Parquet file."""
    rng = random.Random(11)
    vocab = _words(rng, 3000)
    originals = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(300)]
    docs = [(f"o{i}", t) for i, t in enumerate(originals)]
    for i in range(40):
        docs.append((f"e{i}", "  " + originals[i].upper().replace(" ", "\n ")))
    for i in range(40, 100):
        w = originals[i].split()
        w[rng.randrange(len(w))] = "mutated"
        docs.append((f"n{i}", " ".join(w)))
    for i in range(100, 140):
        w = originals[i].split()
        for p in rng.sample(range(len(w)), 25):
            w[p] = rng.choice(vocab)
        docs.append((f"f{i}", " ".join(w)))
    root.mkdir(parents=True, exist_ok=True)
    thirds = [docs[:200], docs[200:380], docs[380:]]
    rows = [{"text": t, "doc": d, "lang": "xx", "n": k} for k, (d, t) in enumerate(thirds[0])]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"text": t, "doc": d, "lang": "xx", "n": k} for k, (d, t) in enumerate(thirds[1])]
    (root / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    pq.write_table(pa.table({"text": [t for _, t in thirds[2]], "doc": [d for d, _ in thirds[2]],
                             "lang": ["xx"] * len(thirds[2]), "n": list(range(len(thirds[2])))}),
                   root / "c.parquet")
    return {"texts": dict(docs), "glob": str(root / "*")}


def _outputs(out: Path) -> dict[str, bytes]:
    files = [p for p in out.rglob("*") if p.is_file()]
    keep = [p for p in files if p.relative_to(out).parts[0] in ("data", "rejects")
            or p.name in ("duplicates.parquet", "stats.json")]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(keep)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_address):
    root = tmp_path_factory.mktemp("planted")
    corpus = _planted(root / "in")
    cfg = DedupeConfig(input=corpus["glob"], id_field="doc")
    stats = run(cfg, _ctx(root / "out"))
    return {**corpus, "cfg": cfg, "out": root / "out", "stats": stats}


def test_planted_duplicates_found_with_high_recall_and_precision(planted):
    out, texts = planted["out"], planted["texts"]
    dups = pq.read_table(out / "duplicates.parquet").to_pylist()
    removed = {d["id"]: d for d in dups}
    exact = {k for k in texts if k.startswith("e")}
    near = {k for k in texts if k.startswith("n")}
    # Exact copies: all found, as exact, pointing at their original (which comes first).
    assert all(removed[k]["kind"] == "exact" and removed[k]["kept_id"] == f"o{k[1:]}" for k in exact)
    recall = len(near & set(removed)) / len(near)
    truly_similar = [k for k in removed if _jaccard(texts[k], texts[removed[k]["kept_id"]]) >= 0.75]
    precision = len(truly_similar) / len(removed)
    assert recall >= 0.95 and precision >= 0.98, (recall, precision)
    assert not any(k.startswith(("o", "f")) for k in removed)  # originals and far copies stay
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("part-*.parquet"))])
    assert kept.column_names[:2] == ["id", "text"] and {"lang", "n"} <= set(kept.column_names)
    assert sorted(kept["id"].to_pylist() + list(removed)) == sorted(texts)
    s = planted["stats"]
    assert json.loads((out / "stats.json").read_text()) == s
    assert (s["docs_in"], s["docs_rejected"], s["docs_out"]) == (len(texts), 0, kept.num_rows)
    assert s["exact_duplicates"] == len(exact) and s["near_duplicates"] == len(removed) - len(exact)
    assert s["bytes_in"] > 0 and s["bytes_out"] > 0 and s["largest_cluster"] == 2


def test_output_is_identical_across_partitions_batches_and_component_algorithms(planted, tmp_path):
    cfg = planted["cfg"].model_copy(update={"components": "ray", "num_partitions": 3, "batch_docs": 37})
    run(cfg, _ctx(tmp_path / "out"))
    assert _outputs(tmp_path / "out") == _outputs(planted["out"])


@pytest.mark.parametrize("mode", ["exact_only", "near_only"])
def test_exact_only_and_near_only_modes(planted, tmp_path, mode):
    cfg = planted["cfg"].model_copy(update={"near": mode != "exact_only", "exact": mode == "exact_only"})
    stats = run(cfg, _ctx(tmp_path / "out"))
    dups = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pylist()
    exact_copies = {k for k in planted["texts"] if k.startswith("e")}
    if mode == "exact_only":
        assert {d["id"] for d in dups} == exact_copies and {d["kind"] for d in dups} == {"exact"}
    else:  # exact copies are still found, as near duplicates (Jaccard 1)
        assert exact_copies < {d["id"] for d in dups} and {d["kind"] for d in dups} == {"near"}
        assert stats["docs_out"] == planted["stats"]["docs_out"]


def test_ray_components_equal_in_process_components(ray_address):
    rng = np.random.default_rng(5)
    src, dst = rng.integers(0, 5000, 4000), rng.integers(0, 5000, 4000)
    chain = np.arange(10_000, 10_600)  # a long path: many rounds for naive label propagation
    star = np.full(300, 20_000)
    src = np.concatenate([src, chain[:-1], star]).astype(np.int64)
    dst = np.concatenate([dst, chain[1:], np.arange(20_001, 20_301)]).astype(np.int64)
    nodes, labels = components_local(src, dst)
    rnodes, rlabels = components_ray(src, dst, num_partitions=4)
    assert np.array_equal(nodes, rnodes) and np.array_equal(labels, rlabels)
    assert labels[np.searchsorted(nodes, 10_599)] == 10_000  # the chain is one component, labelled by its min
    # Reference: union-find.
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(src.tolist(), dst.tolist(), strict=True):
        parent[max(find(u), find(v))] = min(find(u), find(v))
    assert [find(int(n)) for n in nodes] == labels.tolist()


def test_malformed_records_are_quarantined_and_good_ones_kept(ray_address, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"text": f"good document {i} " + "lorem ipsum dolor " * 5}) for i in range(5)]
    big = " ".join(f"w{i}" for i in range(1_500_000))  # ~10 MB, one document
    bad = [b'{"text": "broken', b'{"text": "caf\xe9"}', json.dumps({"title": "x"}).encode(),
           json.dumps({"text": 3}).encode(), json.dumps({"text": ""}).encode()]
    (src / "a.jsonl").write_bytes(b"\n".join([lines[0].encode(), *bad, json.dumps({"text": big}).encode(),
                                              lines[1].encode()]) + b"\n")
    blob = gzip.compress("".join(json.dumps({"text": f"zipped {i} " + "alpha beta gamma " * 20}) + "\n"
                                 for i in range(400)).encode())
    (src / "b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (src / "c.jsonl").write_text("")  # an empty file
    (src / "d.jsonl").write_text("{}\n")  # nothing good in it
    stats = run(DedupeConfig(input=str(src / "*")), _ctx(tmp_path / "out"))
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "data").glob("*.parquet"))])
    ids = set(kept["id"].to_pylist())
    assert {"a.jsonl:1", "a.jsonl:7", "a.jsonl:8"} <= ids
    assert kept.filter(pa.compute.equal(kept["id"], "a.jsonl:7"))["text"][0].as_py() == big
    rejects = [json.loads(x) for p in sorted((tmp_path / "out" / "rejects").glob("*.jsonl"))
               for x in p.read_text().splitlines()]
    reasons = {(Path(r["file"]).name, r["line"]): r["reason"] for r in rejects}
    assert [reasons[("a.jsonl", n)].split(":")[0].split(" (")[0] for n in range(2, 7)] == [
        "invalid JSON", "invalid UTF-8 at byte 13", "missing field 'text'",
        "field 'text' is int, not a string", "field 'text' is empty"]
    assert any(name == "b.jsonl.gz" and r.startswith("truncated gzip") for (name, _), r in reasons.items())
    zipped = [i for i in ids if i.startswith("b.jsonl.gz:")]
    assert zipped and stats["docs_rejected"] == len(rejects)
    # The zipped docs differ only by their number: near duplicates of the first one, which is kept.
    assert "b.jsonl.gz:1" in ids
    assert stats["docs_in"] == stats["docs_out"] + stats["docs_rejected"] + stats["exact_duplicates"] + \
        stats["near_duplicates"]


def test_drifting_templated_corpus_does_not_collapse_into_one_cluster(ray_address, tmp_path):
    rng = random.Random(2)
    stream = _words(rng, 2000)
    # Document i is a window over one long text shifted by 3 words: each is near its neighbours, and
    # transitive closure would chain all 150 together although the first and last share nothing.
    docs = [" ".join(stream[3 * i : 3 * i + 150]) for i in range(150)]
    # Plus documents sharing a boilerplate template with distinct content (J ~ 0.4): not duplicates.
    template = " ".join(_words(rng, 80))
    docs += [f"{template} " + " ".join(_words(rng, 60)) for _ in range(50)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = run(DedupeConfig(input=str(tmp_path / "t.jsonl"), max_cluster_size=20), _ctx(tmp_path / "out"))
    dups = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pylist()
    assert stats["largest_component"] > 20 and stats["oversize_components"] >= 1
    assert stats["largest_cluster"] <= 8 and stats["docs_out"] >= 150 // 8
    line = {f"t.jsonl:{i + 1}": d for i, d in enumerate(docs)}
    assert all(_jaccard(line[d["id"]], line[d["kept_id"]]) >= 0.7 for d in dups)
    assert not any(int(d["id"].split(":")[1]) > 150 for d in dups)  # templated docs all kept


_RESUME_SCRIPT = """
import logging, sys
from pathlib import Path
from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.dedupe.config import DedupeConfig
from stages.dedupe.run import run
out, glob, address = sys.argv[1:4]
ctx = StageContext(name="dedupe", out_dir=out, run_dir=str(Path(out).parent), fingerprint="t", inputs={},
                   tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger("t"),
                   ray_address=address)
run(DedupeConfig(input=glob, id_field="doc", batch_docs=50), ctx)
"""


def test_killed_run_resumes_to_identical_output(planted, ray_address, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = [sys.executable, "-c", _RESUME_SCRIPT, str(out), planted["glob"], ray_address]
    # Killed after the first shard of the map step, then after the first of the filter step (shards
    # already running in other workers may still finish: the driver dies, not the cluster).
    proc = subprocess.run(cmd, env={**env, KILL_ENV: "map:1"}, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 75, proc.stderr.decode()[-3000:]
    assert list((out / "work" / "map").glob("*.json")) and not (out / "work" / "clusters.json").exists()
    proc = subprocess.run(cmd, env={**env, KILL_ENV: "filter:1"}, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 75, proc.stderr.decode()[-3000:]
    assert (out / "work" / "clusters.json").exists() and list((out / "work" / "filter").glob("*.json"))
    assert not (out / "stats.json").exists()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert _outputs(out) == _outputs(planted["out"])


def test_pipeline_runs_dedupe_and_logs_to_mlflow(planted, ray_address, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.runner import run_pipeline

    cfg = validate_config({
        "name": "dd", "workdir": str(tmp_path / "runs"), "ray": {"address": ray_address},
        "stages": {"dedupe": {"input": planted["glob"], "id_field": "doc"}},
    })
    result = run_pipeline(cfg, only="dedupe")
    assert result.outcomes["dedupe"] == "ran"
    sdir = Path(result.stage_dirs["dedupe"])
    assert _outputs(sdir) == _outputs(planted["out"])
    client = MlflowClient(tracking_uri=cfg.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("dd").experiment_id],
                              filter_string="tags.`seedline.stage` = 'dedupe'")
    metrics = runs[0].data.metrics
    assert metrics["docs_in"] == planted["stats"]["docs_in"]
    assert metrics["near_duplicates"] == planted["stats"]["near_duplicates"]
    arts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "dedupe")]
    assert "dedupe/duplicate_pairs_sample.json" in arts
    assert run_pipeline(cfg, only="dedupe").outcomes["dedupe"] == "skipped"


def test_object_store_input_and_output(planted, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("corpus")
    for p in sorted(Path(planted["glob"]).parent.iterdir()):
        fs.put_file(str(p), f"corpus/in/{p.name}")
    cfg = planted["cfg"].model_copy(update={"input": "s3://corpus/in/*"})
    stats = run(cfg, _ctx_url("s3://corpus/out"))
    assert stats == planted["stats"]
    for name in ("duplicates.parquet", "stats.json", "data/part-00000.parquet", "data/part-00002.parquet"):
        assert fs.cat_file(f"corpus/out/{name}") == (planted["out"] / name).read_bytes(), name


def _ctx_url(out: str) -> StageContext:
    return StageContext(name="dedupe", out_dir=out, run_dir=out.rsplit("/", 1)[0], fingerprint="test",
                        inputs={}, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("test"))
