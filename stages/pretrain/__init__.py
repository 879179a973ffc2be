"""Pretrain stage: a causal LM trained from scratch with DeepSpeed ZeRO on Ray Train (config registered)."""

from pipeline.stage import register
from stages.pretrain.config import PretrainConfig

register(name="pretrain", config=PretrainConfig, version="1", run="stages.pretrain.run:run",
         consumes=("tokenize",))

__all__ = ["PretrainConfig"]
