"""The filter stage: language, quality and contamination filters on Ray, one task per input file.

Steps (each resumable): the decontamination index (``work/decontam.*``, when configured), then one Ray
task per input file (``stages.filter.shards``, marker ``work/shards/NNNNN.json``), then ``stats.json``
(written last) and, to MLflow, the counts as metrics and a sample of removed documents per rule.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.common.records import InputFile, expand_inputs
from stages.common.tasks import run_keyed_tasks
from stages.filter.config import FilterConfig
from stages.filter.shards import filter_shard, marker

# Test hook: "shards:N" makes the driver exit hard once N shards have completed in this process.
KILL_ENV = "SEEDLINE_FILTER_KILL_AFTER"
SUM_KEYS = ("docs_in", "docs_rejected", "docs_good", "docs_out", "docs_removed", "text_bytes_in",
            "text_bytes_out", "c4_lines_dropped", "pii_emails", "pii_ips", "pii_docs")


def find_inputs(config: FilterConfig, ctx: StageContext) -> tuple[list[InputFile], str, str | None]:
    """(files, text field, id field): the bound upstream stage's documents, else ``config.input``."""
    up = ctx.input("documents")
    if up is not None:
        paths = storage.glob(storage.join(up.path, "part-*.parquet"))
        return [InputFile(i, p, p.rsplit("/", 1)[-1]) for i, p in enumerate(paths)], "text", "id"
    if not config.input:
        raise ConfigError("stages.filter.input", "required when the pipeline has no dedupe stage")
    return expand_inputs(config.input, "stages.filter.input"), config.text_field, config.id_field


def _check_plan(ctx: StageContext, files: list[InputFile], sets: dict[str, list[str]] | None) -> None:
    """Record the input list (and evaluation sets); if a resumed run sees others, start the stage over."""
    path = ctx.path("work", "plan.json")
    plan: dict[str, Any] = {"inputs": [[f.path, f.rel] for f in files]}
    if sets:  # the pipeline's evaluation data can change without the filter's config changing
        plan["eval_sets"] = sets
    old = storage.read_json_or(path, None)
    if old is not None and old != plan:
        ctx.logger.warning("filter: input files changed since the interrupted run; starting over")
        for name in ("work", "data", "removed", "rejects", "stats.json"):
            storage.remove(ctx.path(name), recursive=True)
    if old != plan:
        storage.write_json(path, plan)


def _eval_sets(config: FilterConfig, ctx: StageContext) -> dict[str, list[str]] | None:
    """The evaluation sets to decontaminate against (``eval_files``, else the pipeline's own eval data)."""
    if config.decontaminate is None:
        return None
    from stages.filter.decontam import eval_sets

    return eval_sets(config.decontaminate, ctx.eval_data)


def _index(config: FilterConfig, ctx: StageContext,
           sets: dict[str, list[str]] | None) -> tuple[tuple[str, str] | None, dict[str, Any]]:
    if config.decontaminate is None or sets is None:
        return None, {}
    from stages.filter.decontam import build_index

    paths = (ctx.path("work", "decontam.npz"), ctx.path("work", "decontam.json"))
    info_path = ctx.path("work", "decontam_sets.json")
    info = storage.read_json_or(info_path, None)
    if info is None or not storage.exists(paths[1]):
        index, info = build_index(config.decontaminate, sets)
        index.save(*paths)
        storage.write_json(info_path, info)
    return paths, info


def merge_stats(shards: list[dict[str, Any]], eval_sets: dict[str, Any]) -> dict[str, Any]:
    """Sum the per-shard stats (samples are left out)."""
    stats: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in shards) for k in SUM_KEYS}
    removed: dict[str, dict[str, int]] = {}
    for s in shards:
        for rule, c in s["removed"].items():
            r = removed.setdefault(rule, {"docs": 0, "text_bytes": 0})
            r["docs"] += c["docs"]
            r["text_bytes"] += c["text_bytes"]
    stats["removed"] = dict(sorted(removed.items()))
    for key in ("languages", "decontaminated", "reject_reasons"):
        total: Counter[str] = Counter()
        for s in shards:
            total.update(s.get(key, {}))
        stats[key] = dict(sorted(total.items()))
    stats["by_source"] = _merge_sources(shards)
    if eval_sets:
        stats["eval_sets"] = eval_sets
    stats["shards"] = len(shards)
    return stats


def _merge_sources(shards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-source counts over the shards: documents and text bytes in and out, removals per rule."""
    out: dict[str, dict[str, Any]] = {}
    for s in shards:
        for src, c in s.get("by_source", {}).items():
            t = out.setdefault(src, {"docs_in": 0, "text_bytes_in": 0, "docs_out": 0, "text_bytes_out": 0,
                                     "removed": Counter()})
            for k in ("docs_in", "text_bytes_in", "docs_out", "text_bytes_out"):
                t[k] += c[k]
            t["removed"].update(c["removed"])
    return {src: {**t, "removed": dict(sorted(t["removed"].items()))} for src, t in sorted(out.items())}


def _samples(shards: list[dict[str, Any]], limit: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in shards:
        for rule, rows in s.get("samples", {}).items():
            bucket = out.setdefault(rule, [])
            bucket.extend(rows[: max(0, limit - len(bucket))])
    return dict(sorted(out.items()))


def _metrics(stats: dict[str, Any]) -> dict[str, float]:
    m = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    for rule, c in stats["removed"].items():
        m[f"removed.{rule}.docs"] = float(c["docs"])
        m[f"removed.{rule}.text_bytes"] = float(c["text_bytes"])
    for name, n in stats["decontaminated"].items():
        m[f"decontaminated.{name}"] = float(n)
    for src, c in stats.get("by_source", {}).items():  # the data funnel, per source
        name = _metric_name(src or "unknown")
        for k in ("docs_in", "text_bytes_in", "docs_out", "text_bytes_out"):
            m[f"source.{name}.{k}"] = float(c[k])
        m[f"source.{name}.docs_removed"] = float(sum(c["removed"].values()))
    return m


def _metric_name(text: str) -> str:
    """A source value as an MLflow metric name part (letters, digits, _ - . / only)."""
    return "".join(ch if ch.isalnum() or ch in "_-./" else "_" for ch in text)


def run(config: FilterConfig, ctx: StageContext) -> dict[str, Any]:
    """Filter the input into ``ctx.out_dir``; returns the stats also written to stats.json."""
    files, text_field, id_field = find_inputs(config, ctx)
    sets = _eval_sets(config, ctx)
    _check_plan(ctx, files, sets)
    index_paths, eval_sets = _index(config, ctx, sets)
    ctx.init_ray()
    import ray

    cfg_ref = ray.put(config)
    t0 = time.perf_counter()
    ctx.logger.info("filter: %d input files", len(files))
    done = run_keyed_tasks(ctx, "shards", [f.index for f in files], lambda k: marker(ctx.out_dir, k),
                           filter_shard, lambda k: (cfg_ref, files[k], ctx.out_dir, text_field, id_field,
                                                    index_paths),
                           workers=config.num_workers, unit="files", kill_env=KILL_ENV)
    shards = [done[f.index] for f in files]
    stats = merge_stats(shards, eval_sets)
    storage.write_json(ctx.path("stats.json"), stats)
    ctx.tracker.log_metrics({**_metrics(stats), "seconds": time.perf_counter() - t0})
    ctx.tracker.log_dict(stats, "filter/stats.json")
    for rule, rows in _samples(shards, config.sample_per_rule).items():
        ctx.tracker.log_dict(rows, f"filter/removed/{rule}.json")
    ctx.progress.update(step="done", done=len(files), total=len(files), unit="files", force=True)
    ctx.logger.info("filter: %d docs in, %d rejected, %d removed, %d out", stats["docs_in"],
                    stats["docs_rejected"], stats["docs_removed"], stats["docs_out"])
    return stats
