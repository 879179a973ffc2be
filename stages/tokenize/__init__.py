"""Tokenize stage: BPE tokenizer, parallel encoding on Ray, packing into Arrow shards (config registered)."""

from pipeline.stage import register
from stages.tokenize.config import TokenizeConfig, check

register(name="tokenize", config=TokenizeConfig, version="1", run="stages.tokenize.run:run", uses=("dedupe",),
         check=check)

__all__ = ["TokenizeConfig"]
