"""Filter stage: language id, Gopher/C4/FineWeb quality rules, decontamination, PII masking (config
registered here)."""

from pipeline.stage import InputSlot, register
from stages.filter.config import FilterConfig, check

# documents in (a dedupe instance's, else the stage's own `input`), documents out in dedupe's layout
# (data/part-*.parquet), so tokenize reads them and a dedupe instance can take them as its input.
register(name="filter", config=FilterConfig, version="1", run="stages.filter.run:run",
         inputs={"documents": InputSlot("documents", required=False, prefer=("dedupe",))},
         outputs={"documents": "data"}, check=check, report="stages.filter.report_section:section",
         verdict="stages.filter.verdict:verdict")

__all__ = ["FilterConfig"]
