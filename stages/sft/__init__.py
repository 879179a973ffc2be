"""SFT stage: ChatML rendering, assistant-only loss, packing, shared trainer (config registered)."""

from pipeline.stage import register
from stages.sft.config import SFTConfig, check

register(name="sft", config=SFTConfig, version="1", run="stages.sft.run:run", uses=("pretrain", "tokenize"),
         check=check)

__all__ = ["SFTConfig"]
