"""An exported ``model/`` directory runs under ``lm_eval --model hf`` (offline, a local multiple-choice task),
and lm-eval's acc / acc_norm equal the evaluate stage's on the same records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import documents, export_stage, mc_examples, tiny_model, write_mc_task

from stages.evaluate.config import TaskConfig
from stages.evaluate.multiple_choice import build_requests, load_task, task_metrics
from stages.evaluate.scoring import Request, score_requests
from stages.lm.hf import import_hf
from stages.tokenize.config import TrainTokenizer
from stages.tokenize.tokenizer import save, train_bpe

LM_EVAL = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
TASK_YAML = """\
task: seedline_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.skipif(LM_EVAL is None, reason="lm-eval is not installed (pip install 'lm_eval[hf]')")
def test_exported_model_runs_under_lm_eval_with_the_same_scores(tmp_path):
    tok = train_bpe(documents(200), TrainTokenizer(vocab_size=300, sample_docs=200))
    save(tok, str(tmp_path / "tokenizer"), 128)
    stage = export_stage(tmp_path, "pretrain", tiny_model(304, 7), tmp_path / "tokenizer")
    mc = write_mc_task(tmp_path / "mc.jsonl", mc_examples(6, seed=5))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "seedline_mc.yaml").write_text(TASK_YAML.format(path=mc))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [LM_EVAL, "run", "--model", "hf", "--model_args", f"pretrained={stage / 'model'},dtype=float32",
           "--tasks", "seedline_mc", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval_out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = list((tmp_path / "lm_eval_out").rglob("results_*.json"))
    theirs = json.loads(result_file.read_text())["results"]["seedline_mc"]

    task = TaskConfig(name="mc", path=str(mc))
    examples, _ = load_task(task)
    model = import_hf(str(stage / "model"))
    reqs = [Request.continuation(c, k) for c, k in build_requests(task, examples, tok)]
    scores = score_requests(model, reqs, 4, torch.device("cpu"))
    ours = task_metrics("mc", examples, [s.logprob for s in scores], None)
    assert theirs["acc,none"] == pytest.approx(ours["mc/acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["mc/acc_norm"])
