"""The pretrain stage: build the task from the tokenize stage's output and run the shared trainer."""

from __future__ import annotations

from pipeline import storage
from pipeline.errors import SeedlineError
from pipeline.stage import StageContext
from stages.lm.trainer import FitResult, fit
from stages.pretrain.config import PretrainConfig
from stages.pretrain.task import PretrainTask


def run(config: PretrainConfig, ctx: StageContext) -> FitResult:
    """Train on ``<tokenize out>/train``, validate on ``val``, export ``<out>/model``."""
    # on an object store: read through each node's shard cache
    sources = {o.instance: o.path for o in ctx.input_list("data")}
    for data_dir in sources.values():
        if not storage.exists(storage.join(data_dir, "manifest.json")):
            raise SeedlineError(f"{data_dir}: no manifest.json; has the tokenize stage finished?")
    init = ctx.input("init")
    init_dir = init.path if init else config.init_from
    task = PretrainTask(sources, config.model, doc_mask=config.doc_mask, init_dir=init_dir,
                        weights=config.data, repeat=config.mixture.on_exhausted == "repeat")
    if task.weights:
        total = sum(task.weights.values())
        ctx.logger.info("pretrain: a mixture of %s", ", ".join(f"{n} {w / total:.0%}"
                                                              for n, w in task.weights.items()))
    ctx.tracker.log_params({"model_resolved": task.model_config.model_dump(mode="json")})
    result = fit(task, config, ctx)
    storage.write_json(ctx.path("stats.json"), {"steps": result.steps, "metrics": result.metrics,
                                                "model": task.model_config.model_dump(mode="json"),
                                                "io": result.io})
    ctx.logger.info("pretrain: %d steps, final loss %.4f, model in %s", result.steps,
                    result.metrics.get("loss", float("nan")), result.model_dir)
    return result
