"""DPO stage: preference pairs, a frozen reference, TRL's losses and metrics on the shared trainer
(config registered; torch-free)."""

from pipeline.stage import register
from stages.dpo.config import DPOConfig, check

register(name="dpo", config=DPOConfig, version="1", run="stages.dpo.run:run", uses=("sft", "tokenize"),
         check=check)

__all__ = ["DPOConfig"]
