"""The node-local shard cache against a real S3 API (moto): fetch once per node, verify, LRU bound."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from moto.server import ThreadedMotoServer

from pipeline import storage
from stages.lm import shard_cache
from stages.lm.data import Loader, PackedDataset
from stages.lm.node_cache import CACHE_ENV, IO

SEQ, ROWS_PER_SHARD = 8, 5


@pytest.fixture(scope="module")
def s3_env():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="cache")
        yield env
    server.stop()


def _shard_bytes(rows: np.ndarray) -> bytes:
    n = len(rows)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.uint16()), SEQ + 1)
    starts = pa.array([[0]] * n, pa.list_(pa.int32()))
    batch = pa.record_batch([tokens, pa.array(np.full(n, SEQ + 1), pa.int32()), starts],
                            names=["tokens", "length", "doc_starts"])
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _write_tokenized(root: str, n_rows: int = 23) -> np.ndarray:
    """A tokenize-stage directory (manifest + shards) at ``root`` (local or URL); returns the rows."""
    rows = np.arange(n_rows * (SEQ + 1), dtype=np.uint16).reshape(n_rows, SEQ + 1) % 60000
    shards = []
    for k, s in enumerate(range(0, n_rows, ROWS_PER_SHARD)):
        data = _shard_bytes(rows[s:s + ROWS_PER_SHARD])
        path = f"train/{k:05d}.arrow"
        storage.write_bytes(storage.join(root, path), data)
        shards.append({"path": path, "rows": len(rows[s:s + ROWS_PER_SHARD]), "tokens": 0,
                       "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    manifest = {"seq_len": SEQ, "rows_per_shard": ROWS_PER_SHARD, "vocab_size": 60000,
                "special_token_ids": {}, "tokenizer": "tokenizer",
                "splits": {"train": {"rows": n_rows, "shards": shards}}}
    storage.write_text(storage.join(root, "manifest.json"), json.dumps(manifest))
    return rows


def test_s3_dataset_equals_the_local_one_and_fetches_each_shard_once(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _write_tokenized(str(tmp_path / "tok"))
    _write_tokenized("s3://cache/run/tok")
    local = PackedDataset(tmp_path / "tok", "train")
    before = dict(IO)
    remote = PackedDataset("s3://cache/run/tok", "train")
    a = Loader(local, 3, seed=1)
    b = Loader(remote, 3, seed=1)
    for _ in range(10):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)
    shard_bytes = sum(sh["bytes"] for sh in remote.manifest["splits"]["train"]["shards"])
    assert IO["bytes_downloaded"] - before["bytes_downloaded"] >= shard_bytes
    assert len(list((tmp_path / "cache" / "shards").glob("*.arrow"))) == 5
    # a second dataset on this node (another rank) downloads nothing
    before = dict(IO)
    again = PackedDataset("s3://cache/run/tok", "train")
    again.prefetch()
    assert IO["bytes_downloaded"] - before["bytes_downloaded"] < 2000  # the manifest only
    assert IO["cache_hits"] - before["cache_hits"] == 5


def _rank_fetch(args) -> int:
    cache, env, url = args
    import os

    os.environ.update(env, **{CACHE_ENV: cache})
    from stages.lm.data import PackedDataset as PD
    from stages.lm.node_cache import IO as io

    PD(url, "train").prefetch()
    return io["bytes_downloaded"]


@pytest.mark.slow
def test_concurrent_ranks_on_one_node_download_each_shard_once(s3_env, tmp_path):
    _write_tokenized("s3://cache/conc/tok")
    cache = str(tmp_path / "cache")
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_rank_fetch, [(cache, s3_env, "s3://cache/conc/tok")] * 2)
    manifest = storage.read_json("s3://cache/conc/tok/manifest.json")
    shard_bytes = sum(sh["bytes"] for sh in manifest["splits"]["train"]["shards"])
    manifest_bytes = len(storage.read_bytes("s3://cache/conc/tok/manifest.json"))
    assert sum(got) == shard_bytes + 2 * manifest_bytes  # every shard crossed the network once


def test_a_replaced_shard_is_refused(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _write_tokenized("s3://cache/bad/tok")
    manifest = storage.read_json("s3://cache/bad/tok/manifest.json")
    data = bytearray(storage.read_bytes("s3://cache/bad/tok/train/00001.arrow"))
    data[-20] ^= 0xFF
    storage.write_bytes("s3://cache/bad/tok/train/00001.arrow", bytes(data))
    ds = PackedDataset("s3://cache/bad/tok", "train")
    ds.row(0)  # shard 0 is fine
    with pytest.raises(ValueError, match="00001.arrow: sha256 differs from the tokenize manifest"):
        ds.row(ROWS_PER_SHARD)
    assert shard_cache.cached(manifest["splits"]["train"]["shards"][1]["sha256"]) is None  # nothing kept


def test_cache_is_bounded_least_recently_used_first(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _write_tokenized("s3://cache/lru/tok")
    shards = storage.read_json("s3://cache/lru/tok/manifest.json")["splits"]["train"]["shards"]
    one = max(sh["bytes"] for sh in shards)
    monkeypatch.setenv(shard_cache.LIMIT_ENV, str(2.5 * one / 2**30))  # room for two shards
    ds = PackedDataset("s3://cache/lru/tok", "train")
    for k in (0, 1, 2):
        ds.row(k * ROWS_PER_SHARD)
    have = {sh["path"] for sh in shards if shard_cache.cached(sh["sha256"])}
    assert have == {"train/00001.arrow", "train/00002.arrow"}  # shard 0 was the least recently used
    # the evicted shard's mapping stays readable in the process that holds it
    assert ds.row(0)[1] == SEQ + 1


def test_local_dataset_reads_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _write_tokenized(str(tmp_path / "tok"))
    ds = PackedDataset(Path(tmp_path / "tok"), "train")
    assert ds.row(7)[1] == SEQ + 1
    assert not (tmp_path / "cache" / "shards").exists()
