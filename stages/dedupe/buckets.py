"""LSH band keys, and the bucket shuffle (on Ray Data, or in process when its rows fit in memory) that
turns them into verified edges.

Each document contributes one row per band (``band``, ``key`` = hash of the band's ``rows`` signature
values) and, for exact dedupe, one row in a pseudo-band ``bands`` whose key is the 128-bit hash of its
normalised text (``key``, ``key2``). Rows are shuffled by a hash of the key so that every bucket lands
whole in one group; a group sorts its buckets by uid and emits *chain* edges between neighbours
(k-1 edges for a bucket of k documents, never all pairs). Near-candidate edges are verified against
the signatures and/or exact shingle sets (``sigstore.Verifier``); exact edges need no check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.dedupe.sigstore import Verifier

_MUL = np.uint64(0x9E3779B97F4A7C15)

FLAG_REJECTED = 0  # near candidate that failed verification
FLAG_NEAR = 1
FLAG_EXACT = 2


def fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: each band's ``rows`` signature values hashed together."""
    n = sigs.shape[0]
    s = sigs[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    k = np.zeros((n, bands), dtype=np.uint64)
    for j in range(rows):
        k = (k ^ s[:, :, j]) * _MUL
    return fmix64(k)


def band_rows(uids: np.ndarray, sigs: np.ndarray, exact: np.ndarray, bands: int, rows: int,
              near: bool, exact_on: bool) -> dict[str, np.ndarray]:
    """The shuffle rows of a batch of documents (columns ``band``, ``key``, ``key2``, ``uid``)."""
    parts: list[tuple[np.ndarray, ...]] = []
    n = len(uids)
    if near:
        keys = band_keys(sigs, bands, rows)
        band = np.repeat(np.arange(bands, dtype=np.int16)[None, :], n, axis=0)
        parts.append((band.ravel(), keys.ravel(), np.zeros(n * bands, np.uint64), np.repeat(uids, bands)))
    if exact_on:
        parts.append((np.full(n, bands, np.int16), exact[:, 0].copy(), exact[:, 1].copy(), uids))
    cols = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    return dict(zip(("band", "key", "key2", "uid"), cols, strict=False))


def _partition_of(key: np.ndarray, band: np.ndarray, num_partitions: int) -> np.ndarray:
    return (fmix64(key ^ band.astype(np.uint64)) % np.uint64(num_partitions)).astype(np.int32)


def load_band_rows(path: str, num_partitions: int) -> Any:
    """A shard's shuffle rows as an Arrow table with its shuffle partition column ``part``."""
    import pyarrow as pa

    from stages.dedupe.tables import read_parquet

    t = read_parquet(path)
    part = _partition_of(t["key"].to_numpy(), t["band"].to_numpy(), num_partitions)
    return t.append_column("part", pa.array(part))


def chain_edges(band: np.ndarray, key: np.ndarray, key2: np.ndarray,
                uid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Chain edges (src < dst) between uid-neighbours of every bucket, and each edge's band."""
    # Most buckets hold one document. One unstable sort of a 64-bit bucket hash finds the others; only
    # their rows get the (bucket, uid) sort. Equality below is checked on the real columns, so a
    # (2^-64) hash collision cannot join two buckets.
    bucket = fmix64(key ^ fmix64(key2 ^ band.astype(np.uint64)))
    order = np.argsort(bucket)
    eq = bucket[order][1:] == bucket[order][:-1]
    shared = np.zeros(len(order), dtype=bool)
    shared[1:] |= eq
    shared[:-1] |= eq
    order = order[shared]
    order = order[np.lexsort((uid[order], bucket[order]))]
    b, k, k2, u = band[order], key[order], key2[order], uid[order]
    same = (b[1:] == b[:-1]) & (k[1:] == k[:-1]) & (k2[1:] == k2[:-1]) & (u[1:] != u[:-1])
    return u[:-1][same], u[1:][same], b[:-1][same]


def reduce_buckets(batch: dict[str, np.ndarray], out: str, exact_band: int,
                   verifier_args: dict[str, Any]) -> dict[str, np.ndarray]:
    """One shuffle group: chain edges of all its buckets, near candidates verified.

    Returns columns ``src``, ``dst`` (uids, src < dst) and ``flag`` (rejected / near / exact).
    """
    src, dst, band = chain_edges(batch["band"], batch["key"], batch["key2"], batch["uid"])
    is_exact = band == exact_band
    ex_src, ex_dst = src[is_exact], dst[is_exact]
    pairs = np.unique(np.stack([src[~is_exact], dst[~is_exact]], axis=1), axis=0) if (~is_exact).any() \
        else np.empty((0, 2), np.int64)
    ok = Verifier(out, **verifier_args).similar(pairs[:, 0], pairs[:, 1])
    flag = np.concatenate([np.full(len(ex_src), FLAG_EXACT, np.int8), np.where(ok, FLAG_NEAR, FLAG_REJECTED)
                           .astype(np.int8)])
    return {"src": np.concatenate([ex_src, pairs[:, 0]]).astype(np.int64),
            "dst": np.concatenate([ex_dst, pairs[:, 1]]).astype(np.int64), "flag": flag}


def shuffle_edges_local(band_files: list[str], out: str, exact_band: int, verifier_args: dict[str, Any],
                        num_partitions: int) -> dict[str, np.ndarray]:
    """The bucket shuffle in this process: the same edges as ``shuffle_edges`` (a bucket lands whole in
    one group either way, and the result is deduplicated and sorted), without Ray Data's fixed cost.

    For shuffles whose rows fit in memory: 26 bytes per row (one per band and document, plus one for
    exact dedupe). Groups are processed one after another so the verifier's reads stay bounded.
    """
    from stages.dedupe.tables import read_parquet

    cols: dict[str, list[np.ndarray]] = {"band": [], "key": [], "key2": [], "uid": []}
    for path in band_files:
        t = read_parquet(path)
        for k in cols:
            cols[k].append(t[k].to_numpy())
    rows = {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}
    part = _partition_of(rows["key"], rows["band"], num_partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
    edges = []
    for g in range(num_partitions):
        sel = order[bounds[g]: bounds[g + 1]]
        if len(sel):
            edges.append(reduce_buckets({k: v[sel] for k, v in rows.items()}, out, exact_band, verifier_args))
    return _merge_edges(edges)


def shuffle_edges(band_files: list[str], out: str, exact_band: int, verifier_args: dict[str, Any],
                  num_partitions: int) -> dict[str, np.ndarray]:
    """Run the bucket shuffle on Ray Data; returns all emitted edges (sorted, so deterministic)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    dctx = ray.data.DataContext.get_current()
    saved = (dctx.enable_progress_bars, dctx.print_on_execution_start, dctx.shuffle_strategy)
    # The sort-based shuffle runs plain tasks; the hash shuffle starts aggregator actors, a fixed cost of
    # seconds that dominates on small clusters.
    dctx.enable_progress_bars, dctx.print_on_execution_start = False, False
    dctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _collect(_bucket_dataset(band_files, out, exact_band, verifier_args, num_partitions))
    finally:
        dctx.enable_progress_bars, dctx.print_on_execution_start, dctx.shuffle_strategy = saved


def _bucket_dataset(band_files: list[str], out: str, exact_band: int, verifier_args: dict[str, Any],
                    num_partitions: int) -> Any:
    import ray
    import ray.data

    # Loading the shards' row files in plain tasks and handing Ray Data the Arrow tables skips
    # read_parquet's metadata and sampling passes (seconds of fixed cost).
    load = ray.remote(load_band_rows)
    ds = ray.data.from_arrow_refs([load.remote(p, num_partitions) for p in band_files])
    return ds.groupby("part").map_groups(
        reduce_buckets, batch_format="numpy",
        fn_kwargs={"out": out, "exact_band": exact_band, "verifier_args": verifier_args},
    )


def _collect(ds: Any) -> dict[str, np.ndarray]:
    """All edges of the Ray Data result (``_merge_edges``)."""
    return _merge_edges(list(ds.iter_batches(batch_format="numpy", batch_size=None)))


def _merge_edges(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """All edges, unique by (src, dst) with the strongest flag, sorted (so the result is deterministic)."""
    cols: dict[str, list[np.ndarray]] = {"src": [], "dst": [], "flag": []}
    for batch in batches:
        for k in cols:
            cols[k].append(np.asarray(batch[k]))
    res = {k: (np.concatenate(v) if v else np.empty(0, np.int8 if k == "flag" else np.int64))
           for k, v in cols.items()}
    res["src"], res["dst"] = res["src"].astype(np.int64), res["dst"].astype(np.int64)
    order = np.lexsort((-res["flag"].astype(np.int16), res["dst"], res["src"]))
    res = {k: v[order] for k, v in res.items()}
    if len(res["src"]) == 0:
        return res
    first = np.r_[True, (res["src"][1:] != res["src"][:-1]) | (res["dst"][1:] != res["dst"][:-1])]
    return {k: v[first] for k, v in res.items()}
