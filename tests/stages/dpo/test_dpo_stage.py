"""The dpo stage end to end on 2 real Ray Train workers (CPU, gloo, real DeepSpeed), one Ray per module.

The reference run goes through the pipeline runner (real MLflow on SQLite) with precomputed reference
log-probs; a second run keeps the reference model in memory, is killed hard after its step-2 checkpoint
and resumed: it must finish with the same bytes as the reference run (same metrics, same weights).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import validate_config
from pipeline.runner import run_pipeline
from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.dpo.config import DPOConfig

REPO = Path(__file__).resolve().parents[3]
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def _config(assets, **changes) -> dict:
    return {"data": assets.train, "val": assets.val, "max_len": 96, "max_prompt_len": 64,
            "init_from": assets.model_dir, "beta": 0.1,
            "train": {"steps": 4, "micro_batch": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup": 1},
            "checkpoint": {"every": 2, "keep": 2}, "eval": {"every": 2, "batches": 1}, "log_every": 1,
            **changes}


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from pipeline.ray_init import init_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        init_ray(None, 4)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


@pytest.fixture(scope="module")
def reference_run(dpo_assets, tmp_path_factory, ray_address) -> dict:
    root = tmp_path_factory.mktemp("dpo-pipe")
    cfg = validate_config({"name": "t", "workdir": str(root / "runs"),
                           "stages": {"dpo": _config(dpo_assets)}})
    res = run_pipeline(cfg)
    return {"out": Path(res.stage_dirs["dpo"]), "tracking_uri": cfg.tracking_uri()}


def _ctx(out: Path, address: str) -> StageContext:
    return StageContext(name="dpo", out_dir=str(out), run_dir=str(out.parent), fingerprint="test",
                        inputs={}, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("test"), ray_address=address)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_use_trl_names_and_reach_mlflow_and_stats(reference_run):
    from mlflow.tracking import MlflowClient

    out = reference_run["out"]
    rows = _lines(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for name in ("loss", "lr", "grad_norm", *TRL_METRICS):
        assert name in train[0], name
    for name in ("loss", *TRL_METRICS):
        assert f"eval_{name}" in evals[0], name
    # Step 1 scores its batch before any update: the policy is the reference.
    assert train[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert train[0]["rewards/margins"] == 0.0 and train[0]["rewards/accuracies"] == 0.0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 4 and stats["data"]["train"]["pairs"] == 48 and stats["heldout_pairs"] == 12
    assert stats["metrics"]["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]
    # The held-out comparison covers every held-out pair, from the stored log-probs.
    ref, pol = (np.concatenate([np.load(f) for f in sorted((out / d / "val").glob("part-*.npy"))])
                for d in ("reference", "policy_logps"))
    assert ref.shape == pol.shape == (12, 2)
    margin = 0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    assert stats["base_eval_logp_accuracy"] == pytest.approx(np.mean(ref[:, 0] > ref[:, 1]))
    assert stats["heldout_logp_accuracy"] == pytest.approx(np.mean(pol[:, 0] > pol[:, 1]))
    assert stats["heldout_rewards/accuracies"] == pytest.approx(np.mean(margin > 0))
    assert stats["heldout_rewards/margins"] == pytest.approx(np.mean(margin), abs=1e-6)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()

    client = MlflowClient(reference_run["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = next(r for r in runs if r.info.run_name == "dpo")
    logged = run.data.metrics
    for key in ("base_eval_logp_accuracy", "heldout_rewards/accuracies", "eval_rewards/accuracies",
                "rewards/margins", "loss", "grad_norm"):
        assert key in logged, key
    assert logged["base_eval_logp_accuracy"] == pytest.approx(stats["base_eval_logp_accuracy"])


def test_killed_in_memory_run_resumes_to_the_precomputed_runs_bytes(dpo_assets, reference_run, ray_address,
                                                                   tmp_path):
    from stages.dpo.run import run

    out = tmp_path / "dpo"
    cfg = _config(dpo_assets, reference="in_memory")
    script = ("import json, logging, sys; from pathlib import Path\n"
              "from stages.dpo.config import DPOConfig; from stages.dpo.run import run\n"
              "from pipeline.stage import Progress, StageContext; from pipeline.tracking import NullTracker\n"
              "out = Path(sys.argv[1])\n"
              "ctx = StageContext(name='dpo', out_dir=str(out), run_dir=str(out.parent), fingerprint='t', "
              "inputs={}, tracker=NullTracker(), progress=Progress(None), logger=logging.getLogger('t'), "
              "ray_address=sys.argv[3])\n"
              "run(DPOConfig(**json.loads(sys.argv[2])), ctx)\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SEEDLINE_TRAIN_KILL_AT_STEP": "2"}
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(cfg), ray_address], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-2" / "complete.json").is_file()
    assert not (out / "model").exists() and not (out / "stats.json").exists()
    assert not (out / "reference" / "train").exists()  # in memory: only the held-out baseline is precomputed

    run(DPOConfig(**cfg), _ctx(out, ray_address))
    ref = reference_run["out"]
    for name in ("metrics.jsonl", "stats.json", "model/model.safetensors", "reference/val/part-00000.npy",
                 "policy_logps/val/part-00000.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
