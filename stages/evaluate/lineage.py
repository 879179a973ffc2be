"""Where a model came from: the fingerprints of every stage instance upstream of the evaluate stage
(``ctx.lineage``, computed by the core from the pipeline's bindings)."""

from __future__ import annotations

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
