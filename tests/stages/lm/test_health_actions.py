"""Acting on a training stage's health (``health:``): loss spikes injected through real data on 2 Ray Train
workers (CPU, gloo, DeepSpeed ZeRO-2), and a worker frozen with SIGSTOP under the stall watchdog."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_trainer
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from test_trainer import PRETRAIN, REPO, _corpus, _ctx, _merge

from pipeline.config import validate_config
from pipeline.errors import SeedlineError
from pipeline.runner import run_pipeline
from pipeline.tracking import Tracker
from stages.lm.data import Loader
from stages.lm.trainer import fit
from stages.pretrain.config import PretrainConfig
from stages.pretrain.task import PretrainTask

BAD = (5, 6)  # data steps whose loss is multiplied: bad data, whichever optimizer step meets it
STEPS = 8
HEALTH = {"warmup_steps": 2, "spike_window": 4, "spike_factor": 3.0, "spike_steps": 2}


ray_address = test_trainer.ray_address  # the same module-scoped fixture: one local Ray per test module


class _Marked(Loader):
    """The pretrain loader, each batch marked with the 1-based data step it comes from."""

    def __next__(self):
        data_step = self.epoch * self.steps_per_epoch + self.consumed // self.global_batch + 1
        return {**super().__next__(), "data_step": torch.tensor(data_step)}


class SpikeTask(PretrainTask):
    """Pretrain whose loss is 30x on the batches of the data steps in ``BAD`` (a real spike: the scaled
    loss goes through backward and the optimizer like any other)."""

    def train_loader(self, rank, world_size, micro_batch, seed, accum=1):
        base = super().train_loader(rank, world_size, micro_batch, seed, accum)
        marked = _Marked.__new__(_Marked)
        marked.__dict__.update(base.__dict__)
        return marked

    def loss(self, model, batch):
        batch = dict(batch)
        data_step = int(batch.pop("data_step", torch.tensor(0)))
        loss, extra = super().loss(model, batch)
        return (loss * 30 if data_step in BAD else loss), extra


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, ray_address):
    """A tokenize stage's output (through the pipeline runner, so the workdir's store holds it)."""
    root = tmp_path_factory.mktemp("health")
    cfg = validate_config(_pipeline(root, {}))
    return {"root": root, "dir": Path(run_pipeline(cfg, only="tokenize").stage_dirs["tokenize"])}


def _pipeline(root: Path, pretrain: dict) -> dict:
    return {"name": "h", "workdir": str(root / "runs"),
            "stages": {"tokenize": {"input": str(_corpus(root / "corpus" / "a.jsonl")), "seq_len": 32,
                                    "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 400}},
                                    "val_fraction": 0.05},
                       "pretrain": _merge(PRETRAIN, pretrain)}}


def _spike_fit(out: Path, tokens, address: str, tracker=None, **changes):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    base = {"train": {"steps": STEPS}, "checkpoint": {"every": 2, "keep": 3}, "eval": {"every": 0}}
    cfg = PretrainConfig(**_merge(_merge(PRETRAIN, base), changes))
    ctx = _ctx(out, tokens["dir"], address)
    if tracker is not None:
        ctx.tracker = tracker
    return fit(SpikeTask(str(tokens["dir"]), cfg.model), cfg, ctx)


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = (load_file(str(d / "model" / "model.safetensors")) for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def skipped_from_start(tmp_path_factory, tokens, ray_address):
    """The run that never sees the bad window: ``train.skip_data`` passes over it before step 5."""
    out = tmp_path_factory.mktemp("skip") / "pretrain"
    _spike_fit(out, tokens, ray_address, train={"skip_data": [list(BAD)]}, health=HEALTH)
    return out


def test_warn_logs_each_spike_to_metrics_mlflow_and_console(tmp_path, tokens, ray_address, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("h")).info.run_id
    out = tmp_path / "pretrain"
    result = _spike_fit(out, tokens, ray_address, tracker=Tracker(uri, run_id), health=HEALTH)
    assert result.steps == STEPS  # warn trains on
    events = [r for r in _rows(out) if "event" in r]
    assert [(e["step"], e["event"]) for e in events] == [(5, "spike"), (6, "diverging")]
    assert events[0]["event_loss"] > 3 * events[0]["loss_median"]
    run = client.get_run(run_id)
    assert "step 5: loss spike" in run.data.tags["health.spike"]
    assert "step 6: the loss diverged" in run.data.tags["health.diverging"]
    assert [m.step for m in client.get_metric_history(run_id, "health/spike")] == [5]
    assert "spike" not in result.metrics and "event" not in result.metrics  # events are not metrics


def test_rollback_ends_bitwise_equal_to_skipping_the_window_from_the_start(tmp_path, tokens, ray_address,
                                                                           skipped_from_start):
    out = tmp_path / "pretrain"
    result = _spike_fit(out, tokens, ray_address, health={**HEALTH, "on_spike": "rollback"})
    assert result.steps == STEPS
    rows = _rows(out)
    events = [r for r in rows if "event" in r]
    assert [(e["step"], e["event"]) for e in events] == [(5, "spike"), (6, "diverging"), (6, "rollback")]
    assert events[-1]["to_step"] == 4 and events[-1]["skipped"] == [5, 6]
    assert [r for r in rows if "event" not in r] == _rows(skipped_from_start)
    assert _same_weights(out, skipped_from_start)


def test_skip_batch_drops_the_spiking_micro_batches_before_their_update(tmp_path, tokens, ray_address,
                                                                        skipped_from_start):
    out = tmp_path / "pretrain"
    result = _spike_fit(out, tokens, ray_address, health={**HEALTH, "on_spike": "skip_batch"})
    assert result.steps == STEPS
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r.get("spike_skipped_batches", 0) for r in rows] == [0, 0, 0, 0, 2, 0, 0, 0]
    assert not [r for r in _rows(out) if "event" in r]  # nothing spiked through to an update
    assert _same_weights(out, skipped_from_start)


def test_fail_stops_at_the_divergence_naming_the_step(tmp_path, tokens, ray_address):
    out = tmp_path / "pretrain"
    with pytest.raises(SeedlineError, match="the loss diverged at step 6 .*on_spike: fail"):
        _spike_fit(out, tokens, ray_address, health={**HEALTH, "on_spike": "fail"})
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert not (out / "model").exists()


def _status(run_dir: Path) -> dict[str, dict]:
    """`seedline status --json RUN_DIR` as a user runs it: stage -> row."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run_dir), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    return {r["stage"]: r for r in json.loads(proc.stdout)}


def test_frozen_worker_shows_stalled_then_is_killed_and_the_stage_resumes(tokens, ray_address, monkeypatch):
    """A worker stopped with SIGSTOP after step 3: `seedline status` says stalled within the configured
    time, the watchdog kills it (on_stall: fail), Ray Train restarts the group from step 2's checkpoint,
    and the run ends with the weights of an uninterrupted one."""
    root = tokens["root"]
    health = {"on_stall": "fail", "stall_factor": 2.0, "stall_min_s": 8.0}
    pretrain = {"train": {"steps": 6}, "checkpoint": {"every": 2, "keep": 3}, "health": health}
    monkeypatch.setenv("SEEDLINE_TRAIN_FREEZE_WORKER_AT_STEP", "3")
    cfg = validate_config({**_pipeline(root, pretrain), "name": "stall"})
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(result=run_pipeline(cfg)), daemon=True)
    thread.start()
    run_dir = Path(cfg.workdir) / cfg.name
    seen, frozen_at = None, None
    while thread.is_alive() and seen is None:
        time.sleep(0.5)
        stage_dir = next(Path(cfg.workdir, "store").glob("pretrain-*"), None)
        if frozen_at is None and stage_dir is not None and (stage_dir / "froze-worker-at-3").exists():
            frozen_at = time.time()
        status = _status(run_dir) if frozen_at is not None and (run_dir / "run.json").exists() else {}
        if status.get("pretrain", {}).get("state") == "stalled":
            seen = time.time() - frozen_at
    thread.join(timeout=600)
    assert seen is not None and seen < 8.0 * 3, seen  # stall_min_s, plus the status's own lag
    stage_dir = Path(done["result"].stage_dirs["pretrain"])
    stalls = [r for r in _rows(stage_dir) if r.get("event") == "stall"]
    assert stalls and stalls[0]["rank"] == 1 and stalls[0]["step"] == 3, stalls
    assert "rank 1" in stalls[0]["message"] and "after step 3" in stalls[0]["message"]
    monkeypatch.delenv("SEEDLINE_TRAIN_FREEZE_WORKER_AT_STEP")
    from stages.pretrain.run import run

    reference = root / "uninterrupted" / "pretrain"
    run(PretrainConfig(**_merge(PRETRAIN, pretrain)), _ctx(reference, tokens["dir"], ray_address))
    assert [r for r in _rows(stage_dir) if "event" not in r] == _rows(reference)
    assert _same_weights(stage_dir, reference)
