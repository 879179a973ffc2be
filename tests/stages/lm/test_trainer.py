"""The shared trainer on 2 real Ray Train workers (CPU, gloo, real DeepSpeed), driven by the pretrain stage.

One Ray per module. The reference run goes through the real pipeline runner (tokenize + pretrain, real
MLflow on SQLite); the other runs reuse its tokenized data.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import validate_config
from pipeline.errors import SeedlineError
from pipeline.runner import run_pipeline
from pipeline.stage import Progress, StageContext, handle
from pipeline.tracking import NullTracker
from stages.lm.trainer import fit
from stages.pretrain.config import PretrainConfig
from stages.pretrain.task import PretrainTask

REPO = Path(__file__).resolve().parents[3]
STEPS = 6
PRETRAIN = {
    "model": {"preset": "tiny", "overrides": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                              "ffn_dim": 128}},
    "train": {"steps": STEPS, "micro_batch": 2, "warmup": 2, "lr": 3e-3, "min_lr": 3e-4, "seed": 3},
    "deepspeed": {"zero_stage": 2},
    "checkpoint": {"every": 2, "keep": 2},
    "eval": {"every": 3, "batches": 2},
    "log_every": 1,
}


def _merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _corpus(path: Path, n: int = 400) -> Path:
    """Documents with learnable structure (repeated phrases), so a few steps visibly lower the loss."""
    rng = random.Random(0)
    phrases = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
               "all that glitters is not gold", "to be or not to be that is the question"]
    rows = [{"id": f"d{i}", "text": " ".join(rng.choice(phrases) for _ in range(rng.randint(2, 12)))}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
def reference(tmp_path_factory, ray_address):
    """tokenize + pretrain (ZeRO-2, 2 workers) through the pipeline runner: the reference run."""
    root = tmp_path_factory.mktemp("pipe")
    cfg = validate_config({
        "name": "t", "workdir": str(root / "runs"),
        "stages": {"tokenize": {"input": str(_corpus(root / "corpus" / "a.jsonl")), "seq_len": 32,
                                "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 400}},
                                "val_fraction": 0.05},
                   "pretrain": PRETRAIN},
    })
    res = run_pipeline(cfg)
    return {"tokenize": Path(res.stage_dirs["tokenize"]), "pretrain": Path(res.stage_dirs["pretrain"]),
            "tracking_uri": cfg.tracking_uri(), "run_dir": res.run_dir}


def _ctx(out: Path, data_dir: Path, address: str) -> StageContext:
    return StageContext(name="pretrain", out_dir=str(out), run_dir=str(out.parent), fingerprint="test",
                        inputs={"data": [handle("tokenize", str(data_dir), "shards")]},
                        tracker=NullTracker(), progress=Progress(str(out / "progress.json")),
                        logger=logging.getLogger("test"), ray_address=address)


def _train(out: Path, reference: dict, address: str, **changes):
    from stages.pretrain.run import run

    return run(PretrainConfig(**_merge(PRETRAIN, changes)), _ctx(out, reference["tokenize"], address))


_ZERO_RUNS: dict[int, Path] = {}


def _zero_run(stage: int, tmp_path_factory, reference, address) -> Path:
    """An uninterrupted run at ZeRO ``stage`` (made once per module)."""
    if stage not in _ZERO_RUNS:
        out = tmp_path_factory.mktemp(f"zero{stage}") / "pretrain"
        _train(out, reference, address, deepspeed={"zero_stage": stage})
        _ZERO_RUNS[stage] = out
    return _ZERO_RUNS[stage]


def _lines(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def test_pretrain_loss_falls_and_is_tracked(reference):
    from mlflow.tracking import MlflowClient

    out = reference["pretrain"]
    train, evals = _lines(out)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [3, 6]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert train[-1]["tokens"] == STEPS * 2 * 2 * 32  # steps x workers x micro_batch x seq_len
    assert [r["lr"] for r in train[:2]] == pytest.approx([1.5e-3, 3e-3])
    assert train[-1]["lr"] == pytest.approx(3e-4)
    assert all(r["grad_norm"] > 0 for r in train)
    perf = [json.loads(ln) for ln in (out / "perf.jsonl").read_text().splitlines()]
    assert [r["step"] for r in perf] == list(range(1, STEPS + 1)) and all(r["tokens_per_s"] > 0 for r in perf)
    # checkpoints: the newest `keep` complete ones only
    assert _checkpoints(out) == ["step-4", "step-6"]
    assert json.loads((out / "checkpoints/step-6/complete.json").read_text())["world_size"] == 2
    # the stage's MLflow run has the per-step metrics; its status shows the progress
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["progress"]["step"] == STEPS
    assert status["progress"]["tokens"] == train[-1]["tokens"]
    client = MlflowClient(reference["tracking_uri"])
    history = client.get_metric_history(status["mlflow_run_id"], "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in train])
    keys = client.get_run(status["mlflow_run_id"]).data.metrics
    assert {"eval_loss", "lr", "grad_norm", "tokens_per_s", "final_loss"} <= set(keys)


def test_summary_and_report_verdict_judge_each_stage_on_its_target(reference):
    from mlflow.tracking import MlflowClient

    from pipeline.report import write_report
    from pipeline.summary import summary_lines

    train, evals = _lines(reference["pretrain"])
    stats = json.loads((reference["tokenize"] / "stats.json").read_text())
    lines = summary_lines(reference["run_dir"], {})
    [pre] = [ln for ln in lines if ln.split()[0] == "pretrain"]
    assert f"loss, step 1 -> held-out {train[0]['loss']:.4g} -> {evals[-1]['eval_loss']:.4g}" in pre
    [tok] = [ln for ln in lines if ln.split()[0] == "tokenize"]
    assert f"train tokens {stats['tokens_train']:,}" in tok
    page = Path(write_report(reference["run_dir"])).read_text()
    verdict = page[page.index("<h2>Verdict</h2>"):page.index("<h2>Stages</h2>")]
    assert "better" in verdict and "loss, step 1 -&gt; held-out" in verdict
    run_id = json.loads((reference["pretrain"] / "status.json").read_text())["mlflow_run_id"]
    experiment = MlflowClient(reference["tracking_uri"]).get_run(run_id).info.experiment_id
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in verdict


def test_export_loads_in_transformers_with_the_trained_logits(reference):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from stages.lm.model import CausalLM

    out = reference["pretrain"]
    task = PretrainTask(str(reference["tokenize"]), PretrainConfig(**PRETRAIN).model)
    trained = CausalLM(task.model_config)
    # the ZeRO-2 checkpoint's model states hold the full fp32 weights of the last step
    states = torch.load(out / "checkpoints/step-6/mp_rank_00_model_states.pt", weights_only=False)
    trained.load_state_dict(states["module"])
    hf = LlamaForCausalLM.from_pretrained(out / "model")
    ids = torch.randint(0, task.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = trained(ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.decode(tok("a stitch in time")["input_ids"]) == "a stitch in time"


def test_zero3_trains_like_zero2(tmp_path_factory, reference, ray_address):
    out = _zero_run(3, tmp_path_factory, reference, ray_address)
    train, _ = _lines(out)
    ref, _ = _lines(reference["pretrain"])
    assert len(train) == STEPS
    # same init and data: the first loss is the same, later ones agree up to reduction order
    assert train[0]["loss"] == pytest.approx(ref[0]["loss"], abs=1e-6)
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in ref], abs=2e-3)
    assert (out / "checkpoints/step-6/zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    # parameters are partitioned too: each rank saves its own model shard
    assert (out / "checkpoints/step-6/zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()
    assert _weights(out).keys() == _weights(reference["pretrain"]).keys()


KILLED_RUN = r"""
import json, logging, sys
from pathlib import Path
from pipeline.stage import Progress, StageContext, handle
from pipeline.tracking import NullTracker
from stages.pretrain.config import PretrainConfig
from stages.pretrain.run import run
out, data, address, cfg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ctx = StageContext(name="pretrain", out_dir=out, run_dir=str(Path(out).parent), fingerprint="test",
                   inputs={"data": [handle("tokenize", data, "shards")]}, tracker=NullTracker(),
                   progress=Progress(None), logger=logging.getLogger("test"), ray_address=address)
run(PretrainConfig(**cfg), ctx)
print("NOT KILLED")
"""


def test_killed_then_resumed_run_is_bitwise_identical(tmp_path, reference, ray_address):
    out = tmp_path / "pretrain"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "SEEDLINE_TRAIN_KILL_AT_STEP": "4"}
    args = [str(out), str(reference["tokenize"]), ray_address, json.dumps(PRETRAIN)]
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 137, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "checkpoints/step-4/complete.json").is_file() and not (out / "model").exists()
    result = _train(out, reference, ray_address)  # resumes from step 4
    assert result.steps == STEPS
    ref = reference["pretrain"]
    assert (out / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    mine, theirs = _weights(out), _weights(ref)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_dead_worker_is_replaced_and_zero3_resumes_exactly(tmp_path, tmp_path_factory, reference, ray_address,
                                                           monkeypatch):
    uninterrupted = _zero_run(3, tmp_path_factory, reference, ray_address)
    out = tmp_path / "pretrain"
    monkeypatch.setenv("SEEDLINE_TRAIN_FAIL_WORKER_AT_STEP", "3")
    result = _train(out, reference, ray_address, deepspeed={"zero_stage": 3})
    assert result.steps == STEPS
    assert (out / "failed-worker-at-3").is_file()  # rank 1 really died at step 3; a new group resumed at 2
    assert (out / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    mine, theirs = _weights(out), _weights(uninterrupted)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


class NanTask(PretrainTask):
    """Pretrain whose loss turns NaN on one rank at one training step (a real NaN through the engine)."""

    def __init__(self, *args, nan_step: int, nan_rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step, self.nan_rank, self.calls, self.rank = nan_step, nan_rank, 0, -1

    def train_loader(self, rank, world_size, micro_batch, seed, accum=1):
        self.rank = rank
        return super().train_loader(rank, world_size, micro_batch, seed, accum)

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        if model.training:
            self.calls += 1
            if self.calls == self.nan_step and self.rank == self.nan_rank:
                loss = loss * float("nan")
        return loss, extra


def _nan_fit(out: Path, reference, address, policy: str, steps: int, zero_stage: int):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    cfg = PretrainConfig(**_merge(PRETRAIN, {"train": {"steps": steps, "nan_policy": policy},
                                             "deepspeed": {"zero_stage": zero_stage}}))
    task = NanTask(str(reference["tokenize"]), cfg.model, nan_step=3, nan_rank=1)
    return fit(task, cfg, _ctx(out, reference["tokenize"], address))


def test_nan_loss_stops_naming_the_step_without_a_nan_checkpoint(tmp_path, reference, ray_address):
    out = tmp_path / "pretrain"
    with pytest.raises(SeedlineError, match="non-finite loss at step 3"):
        _nan_fit(out, reference, ray_address, "stop", 4, zero_stage=2)
    assert _checkpoints(out) == ["step-2"]
    assert not (out / "model").exists()
    train, _ = _lines(out)
    assert [r["step"] for r in train] == [1, 2]


def test_zero1_trains_and_skip_policy_drops_a_nan_batch(tmp_path, reference, ray_address):
    out = tmp_path / "pretrain"
    result = _nan_fit(out, reference, ray_address, "skip", STEPS, zero_stage=1)
    train, _ = _lines(out)
    ref, _ = _lines(reference["pretrain"])
    assert result.steps == STEPS and [r.get("skipped_batches", 0) for r in train] == [0, 0, 1, 0, 0, 0]
    # ZeRO-1 matches ZeRO-2 until the skipped batch changes the data; then it keeps learning
    assert [r["loss"] for r in train[:2]] == pytest.approx([r["loss"] for r in ref[:2]], abs=1e-5)
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert (out / "checkpoints/step-6/zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert all(torch.isfinite(w).all() for w in _weights(out).values())


def test_val_batches_fill_every_rank_equally(reference):
    task = PretrainTask(str(reference["tokenize"]), PretrainConfig(**PRETRAIN).model)
    per_rank = [list(task.val_batches(r, 2, 4, limit=3)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1
    assert all(b["input_ids"].shape == (4, 32) for batches in per_rank for b in batches)


def _traced_steps(trace: Path) -> dict[int, list[int]]:
    """Rows each optimizer step took (every rank's micro-batches), from the trace hook's files."""
    steps: dict[int, list[int]] = {}
    for f in trace.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["rows"])
    return steps


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_on_one_worker_continues_a_two_worker_run(zero_stage, tmp_path, tmp_path_factory, reference,
                                                         ray_address, monkeypatch):
    """A 2-worker run's step-4 checkpoint resumed on 1 worker (the global batch kept by accumulating 2
    micro-batches): DeepSpeed's universal checkpoint reshards the ZeRO state, steps 5-6 take exactly the
    rows the 2-worker run took, and the losses and weights agree up to reduction order."""
    import shutil

    from stages.lm.data import Loader, PackedDataset

    two = reference["pretrain"] if zero_stage == 2 else _zero_run(3, tmp_path_factory, reference, ray_address)
    out = tmp_path / "pretrain"
    shutil.copytree(two / "checkpoints" / "step-4", out / "checkpoints" / "step-4")  # killed after step 4
    shutil.copyfile(two / "metrics.jsonl", out / "metrics.jsonl")
    monkeypatch.setenv("SEEDLINE_TRAIN_TRACE_DIR", str(tmp_path / "trace"))
    result = _train(out, reference, ray_address, deepspeed={"zero_stage": zero_stage},
                    train={"grad_accum": 2}, scaling={"num_workers": 1})
    assert result.steps == STEPS
    mine, theirs = _lines(out)[0], _lines(two)[0]
    assert mine[:4] == theirs[:4]  # kept from the 2-worker run
    assert [r["loss"] for r in mine[4:]] == pytest.approx([r["loss"] for r in theirs[4:]], rel=1e-4)
    assert [r["lr"] for r in mine] == [r["lr"] for r in theirs]
    w1, w2 = _weights(out), _weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w2)
    # sample accounting: the rows of steps 5-6 are those the 2-worker schedule takes, none twice
    ds = PackedDataset(str(reference["tokenize"]), "train")
    loaders = [Loader(ds, 2, rank=r, world_size=2, seed=PRETRAIN["train"]["seed"]) for r in range(2)]
    expected = {s: sorted(i for ld in loaders for i in ld.next_indices().tolist())
                for s in range(1, STEPS + 1)}
    traced = _traced_steps(tmp_path / "trace")
    assert [f.name.split("-pid-")[0] for f in (tmp_path / "trace").iterdir()] == ["world-1-rank-0"]
    assert {s: sorted(r) for s, r in traced.items()} == {5: expected[5], 6: expected[6]}
    assert len(set(traced[5] + traced[6])) == 8
    from stages.lm.reshard import universal_root

    assert not universal_root(str(out.resolve())).exists()  # the node-local conversion is dropped
