"""Pretrain stage: a causal LM trained from scratch with DeepSpeed ZeRO on Ray Train (config registered)."""

from pipeline.stage import InputSlot, register
from stages.pretrain.config import PretrainConfig, check

# data: a tokenize instance's shards, or several named with weights by `data:` (a mixture); init: the
# model of another instance named by `init_from` (continued pretraining, e.g. an annealing phase), else a
# fresh model from `model.preset`.
register(name="pretrain", config=PretrainConfig, version="1", run="stages.pretrain.run:run",
         inputs={"data": InputSlot("shards", prefer=("tokenize",), config_key="data"),
                 "init": InputSlot("model", required=False, config_key="init_from", auto=False)},
         outputs={"model": "model", "metrics": "metrics.jsonl"}, check=check,
         report="stages.pretrain.report_section:section", verdict="stages.lm.verdict:pretrain")

__all__ = ["PretrainConfig"]
