"""What a training worker's start-up avoids, and the Ray Train settings a run starts with."""

import os
import subprocess
import sys
from pathlib import Path

from stages.lm.trainer import ray_train_env

REPO = Path(__file__).resolve().parents[3]


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after():
    code = ("import sys\n"
            "from stages.lm.ds_import import import_deepspeed\n"
            "ds = import_deepspeed()\n"
            "assert ds.initialize and 'mlflow' not in sys.modules\n"
            "import mlflow\n"
            "assert mlflow.MlflowClient\n"
            "assert import_deepspeed() is ds\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def test_ray_train_settings_are_set_while_a_run_starts_and_the_users_win(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    with ray_train_env(elastic=False):
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
        assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    with ray_train_env(elastic=True):
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
        assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "20"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ
