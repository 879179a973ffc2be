"""Where a model came from: the fingerprints of every stage instance upstream of the evaluate stage
(``ctx.lineage``, computed by the core from the pipeline's bindings), and whether its training data was
decontaminated against the evaluation sets."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

from pipeline import storage
from pipeline.stage import StageContext


def upstream_fingerprints(ctx: StageContext) -> dict[str, str]:
    """``{instance: fingerprint}`` of every stage instance the evaluate stage depends on, directly or not."""
    direct = {o.instance: o.fingerprint for outs in ctx.inputs.values() for o in outs}
    return dict(sorted((direct | ctx.lineage).items()))


def lineage_tags(ctx: StageContext) -> dict[str, str]:
    """Model-version tags: run directory, tokenizer sha256, evaluate and upstream fingerprints."""
    tags = {"seedline.run_dir": ctx.run_dir, "seedline.fingerprint.evaluate": ctx.fingerprint}
    data = ctx.input("data")
    if data is not None:
        manifest = storage.read_json(storage.join(data.path, "manifest.json"))
        tags["seedline.tokenizer_sha256"] = manifest["tokenizer_sha256"]
    for name, fp in upstream_fingerprints(ctx).items():
        tags[f"seedline.fingerprint.{name}"] = fp
    return tags


def decontamination(ctx: StageContext) -> dict[str, Any]:
    """Whether a filter instance upstream decontaminated the training data, against which evaluation sets,
    and which of this stage's own evaluation sets none of them covered (``results.json``'s record).

    Read from the runner's ``ctx.extra["upstream"]`` ({instance: {type, config}}) and ``ctx.eval_data``: a
    filter with ``decontaminate`` and no ``eval_files`` used every set of ``ctx.eval_data``.
    """
    upstream = ctx.extra.get("upstream") or {}
    by: dict[str, list[str]] = {}
    for name, info in sorted(upstream.items()):
        d = (info.get("config") or {}).get("decontaminate") if info.get("type") == "filter" else None
        if d is not None:
            by[name] = list(d.get("eval_files") or sorted(ctx.eval_data))
    own = {k: v for k, v in ctx.eval_data.items() if k.startswith(f"{ctx.name}.")}
    covered = {s for sets in by.values() for s in sets}
    uncovered = [k for k, paths in sorted(own.items())
                 if k not in covered and not all(any(fnmatch(p, g) for g in covered) for p in paths)]
    return {"ran": bool(by), "by": by, "uncovered": uncovered}
