"""Tokenize stage: BPE tokenizer, parallel encoding on Ray, packing into Arrow shards (config registered)."""

from pipeline.stage import InputSlot, register
from stages.tokenize.config import TokenizeConfig, check

# documents: the output of a filter or dedupe instance (the last of the chain when both run), else the
# stage's own `input`. tokenizer (only when named in `inputs:`): another tokenize instance's tokenizer
# is used instead of training one (sources of a pretraining mixture share one vocabulary).
# shards: the packed Arrow dataset (manifest.json at its root, see layout.py).
register(name="tokenize", config=TokenizeConfig, version="1", run="stages.tokenize.run:run",
         inputs={"documents": InputSlot("documents", required=False, prefer=("filter", "dedupe")),
                 "tokenizer": InputSlot("tokenizer", required=False, auto=False)},
         outputs={"shards": "", "tokenizer": "tokenizer"}, check=check,
         report="stages.tokenize.report_section:section", verdict="stages.tokenize.verdict:verdict")

__all__ = ["TokenizeConfig"]
