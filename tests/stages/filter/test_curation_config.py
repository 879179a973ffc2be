"""configs/curation.yaml (two sources, each deduplicated, filtered and tokenized; pretrain on their weighted
mixture; evaluate, on the demo data) passes the pre-flight and `seedline plan` explains every stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_curation_config_plans_on_the_demo_data(tmp_path):
    from pipeline.config import load_config
    from pipeline.example_data import write_all
    from pipeline.preflight import eval_data

    write_all(tmp_path / "demo-data", max_modules=30)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(REPO / "configs" / "curation.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = {line.split()[0]: line.split()[2].rsplit("-", 1)[0] for line in proc.stdout.splitlines()
               if line.strip()}
    assert planned == {"docs_dedupe": "dedupe", "code_dedupe": "dedupe", "docs_filter": "filter",
                       "code_filter": "filter", "docs": "tokenize", "code": "tokenize",
                       "pretrain": "pretrain", "evaluate": "evaluate"}, proc.stdout
    cfg = load_config(REPO / "configs" / "curation.yaml")
    # the filter's decontamination has the evaluate stage's task and prompts to read
    assert set(eval_data(cfg.stage_configs())) == {"evaluate.tasks.0.path", "evaluate.prompts"}
