"""Where a model came from: the fingerprints of every stage upstream of the evaluate stage.

``ctx.upstream`` names the direct inputs (tokenize and the model stages); their own inputs (dedupe) are
found through the run directory: ``run.json`` maps each stage to its directory, whose ``status.json`` holds
the fingerprint, and the stage registry says which stage reads which.
"""

from __future__ import annotations

from pipeline import stage as stage_registry
from pipeline import storage
from pipeline.stage import StageContext
from pipeline.state import read_status


def upstream_fingerprints(ctx: StageContext) -> dict[str, str]:
    """``{stage: fingerprint}`` of every stage the evaluate stage depends on, directly or not."""
    fps = {name: up.fingerprint for name, up in ctx.upstream.items()}
    dirs = storage.read_json_or(storage.join(ctx.run_dir, "run.json"), {}).get("stages", {})
    present = set(dirs)
    todo = list(fps)
    while todo:
        name = todo.pop()
        if name not in dirs:
            continue
        for dep in stage_registry.get(name).inputs(present):
            if dep in fps or dep not in dirs:
                continue
            fp = read_status(storage.join(ctx.run_dir, dirs[dep])).get("fingerprint")
            if fp:
                fps[dep] = fp
                todo.append(dep)
    return dict(sorted(fps.items()))


def lineage_tags(ctx: StageContext) -> dict[str, str]:
    """Model-version tags: run directory, tokenizer sha256, evaluate and upstream fingerprints."""
    tags = {"seedline.run_dir": ctx.run_dir, "seedline.fingerprint.evaluate": ctx.fingerprint}
    tokenize = ctx.upstream.get("tokenize")
    if tokenize is not None:
        manifest = storage.read_json(storage.join(tokenize.out_dir, "manifest.json"))
        tags["seedline.tokenizer_sha256"] = manifest["tokenizer_sha256"]
    for name, fp in upstream_fingerprints(ctx).items():
        tags[f"seedline.fingerprint.{name}"] = fp
    return tags
