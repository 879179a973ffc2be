"""The dedupe stage: exact and MinHash-LSH near-duplicate removal on Ray.

Steps (each resumable):

1. **map** (Ray task per input file): read with quarantine, normalise, sign; write the shard's docs,
   signatures and shuffle rows; marker ``work/map/NNNNN.json``.
2. **clusters** (driver + Ray): bucket shuffle on Ray Data with verified chain edges, connected
   components (Ray or in process), oversize-cluster re-verification, removal table; marker
   ``work/clusters.json``. Recomputed whole if interrupted (it is deterministic).
3. **filter** (Ray task per shard): kept documents to ``data/part-NNNNN.parquet``; marker
   ``work/filter/NNNNN.json``.
4. **finalize**: ``duplicates.parquet``, ``stats.json`` (written last), metrics and a sample of
   duplicate pairs to MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.stage import StageContext
from stages.common.records import InputFile, expand_inputs
from stages.common.tasks import run_keyed_tasks
from stages.dedupe.buckets import FLAG_EXACT, FLAG_NEAR, shuffle_edges, shuffle_edges_local
from stages.dedupe.clusters import removal_table, resolve
from stages.dedupe.components import connected_components
from stages.dedupe.config import DedupeConfig
from stages.dedupe.finalize import build_manifest, merge_stats, sample_pairs, write_duplicates
from stages.dedupe.layout import Layout
from stages.dedupe.shards import filter_shard, map_shard
from stages.dedupe.sigstore import Verifier
from stages.dedupe.tables import write_parquet

# Test hook: "map:N" or "filter:N" makes the driver exit hard (no cleanup) once N shards of that step
# have completed in this process, to prove that a killed run resumes to identical output.
KILL_ENV = "SEEDLINE_DEDUPE_KILL_AFTER"


def _check_plan(lay: Layout, inputs: list[InputFile], bands: int, rows: int, ctx: StageContext) -> None:
    """Record the input list; if a resumed run sees different inputs, start the stage over."""
    plan = {"inputs": [[f.path, f.rel] for f in inputs], "bands": bands, "rows": rows}
    old = storage.read_json_or(lay.plan, None)
    if old is not None and old != plan:
        ctx.logger.warning("dedupe: input files changed since the interrupted run; starting over")
        for name in ("work", "data", "rejects", "duplicates.parquet", "stats.json"):
            storage.remove(lay.p(name), recursive=True)
    if old != plan:
        storage.write_json(lay.plan, plan)


def _run_shards(ctx: StageContext, step: str, keys: list[int], marker: Callable[[int], str],
                fn: Callable[..., dict[str, Any]], args: Callable[[int], tuple]) -> list[dict[str, Any]]:
    """Run ``fn(*args(key))`` as a Ray task for every shard without a marker; stats of all shards."""
    done = run_keyed_tasks(ctx, step, keys, marker, fn, args, unit="shards", kill_env=KILL_ENV)
    return [done[k] for k in keys]


def _clusters(config: DedupeConfig, lay: Layout, num_partitions: int, ctx: StageContext,
              docs_good: int) -> dict[str, Any]:
    """Bucket shuffle, components, removal table. Returns cluster stats (also the step's marker)."""
    bands, rows = config.lsh_params()
    t0 = time.perf_counter()
    plan = storage.read_json(lay.plan)
    band_files = [lay.bands(i) for i in range(len(plan["inputs"]))]
    rows_total = docs_good * (bands * config.near + config.exact)
    if docs_good and config.shuffle_in_process(rows_total):
        edges = shuffle_edges_local(band_files, lay.out, bands, config.verifier_args(), num_partitions)
    elif docs_good:
        edges = shuffle_edges(band_files, lay.out, bands, config.verifier_args(), num_partitions)
    else:
        edges = {"src": np.empty(0, np.int64), "dst": np.empty(0, np.int64), "flag": np.empty(0, np.int8)}
    flag = edges["flag"]
    t1 = time.perf_counter()
    exact_dups = np.unique(edges["dst"][flag == FLAG_EXACT])
    keep = flag != 0
    nodes, labels = connected_components(edges["src"][keep], edges["dst"][keep], config.components,
                                         config.local_max_edges, num_partitions)
    t2 = time.perf_counter()
    verifier = Verifier(lay.out, **config.verifier_args()) if config.near else None
    rm = resolve(nodes, labels, exact_dups, verifier, config.max_cluster_size)
    write_parquet(removal_table(lay.out, rm), lay.removed, 65536)
    stats = {
        "lsh_bands": bands, "lsh_rows": rows, "candidate_pairs": int(np.count_nonzero(flag != FLAG_EXACT)),
        "verified_pairs": int(np.count_nonzero(flag == FLAG_NEAR)),
        "exact_pairs": int(np.count_nonzero(flag == FLAG_EXACT)),
        "clustered_docs": len(nodes), "components": len(np.unique(labels)),
        "largest_component": rm.largest_component, "largest_cluster": rm.largest_cluster,
        "oversize_components": rm.oversize_components,
    }
    ctx.tracker.log_metrics({"seconds_shuffle": t1 - t0, "seconds_components": t2 - t1,
                             "seconds_resolve": time.perf_counter() - t2})
    storage.write_json(lay.clusters_done, stats)
    return stats


def run(config: DedupeConfig, ctx: StageContext) -> dict[str, Any]:
    """Deduplicate ``config.input`` into ``ctx.out_dir``; returns the stats also written to stats.json."""
    lay = Layout(ctx.out_dir)
    inputs = expand_inputs(config.input, "stages.dedupe.input")
    bands, rows = config.lsh_params()
    _check_plan(lay, inputs, bands, rows, ctx)
    ctx.init_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    num_partitions = config.num_partitions or max(2, 4 * cpus)
    cfg_ref = ray.put(config)
    keys = [f.index for f in inputs]
    t0 = time.perf_counter()
    ctx.logger.info("dedupe: %d input files, LSH %d bands x %d rows", len(inputs), bands, rows)
    map_stats = _run_shards(ctx, "map", keys, lay.map_done, map_shard,
                            lambda k: (cfg_ref, inputs[k], lay.out))
    t1 = time.perf_counter()
    cluster_stats = storage.read_json_or(lay.clusters_done, None)
    if cluster_stats is None:
        ctx.progress.update(step="clusters", force=True)
        cluster_stats = _clusters(config, lay, num_partitions, ctx, sum(m["docs_good"] for m in map_stats))
    t2 = time.perf_counter()
    filter_stats = _run_shards(ctx, "filter", keys, lay.filter_done, filter_shard,
                               lambda k: (cfg_ref, k, lay.out))
    write_duplicates(lay.out, keys, config.row_group_rows)
    stats = merge_stats(map_stats, filter_stats, cluster_stats)
    storage.write_json(lay.p("manifest.json"), build_manifest(lay.out, config))
    storage.write_json(lay.stats, stats)
    t3 = time.perf_counter()
    ctx.tracker.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    ctx.tracker.log_metrics({"seconds_map": t1 - t0, "seconds_clusters": t2 - t1, "seconds_filter": t3 - t2,
                             "docs_per_second": stats["docs_in"] / max(t3 - t0, 1e-9)})
    ctx.tracker.log_dict(stats, "dedupe/stats.json")
    ctx.tracker.log_dict(sample_pairs(lay.out), "dedupe/duplicate_pairs_sample.json")
    ctx.progress.update(step="done", done=len(keys), total=len(keys), unit="shards", force=True)
    ctx.logger.info("dedupe: %d docs in, %d rejected, %d exact and %d near duplicates, %d out",
                    stats["docs_in"], stats["docs_rejected"], stats["exact_duplicates"],
                    stats["near_duplicates"], stats["docs_out"])
    return stats
