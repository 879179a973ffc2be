"""The shared trainer with an object-store stage directory (a real S3 API: moto) on 2 real Ray Train workers:
the same losses and weights as a local-disk run, kill-and-resume from S3 checkpoints bitwise, keep-last-k on
S3, and a planted pickle in a checkpoint refused at resume without running it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from test_trainer import KILLED_RUN, PRETRAIN, REPO, _corpus, _merge

from pipeline import storage
from pipeline.config import validate_config
from pipeline.errors import SeedlineError
from pipeline.runner import run_pipeline
from pipeline.stage import Progress, StageContext, handle
from pipeline.tracking import NullTracker
from stages.pretrain.config import PretrainConfig

pytestmark = pytest.mark.slow
BUCKET = "s3://train"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """moto on 127.0.0.1 and a local Ray started after the S3 settings are in the environment (its workers
    inherit them); the tokenize stage run locally and copied to S3."""
    import boto3
    import ray

    from pipeline.ray_init import init_ray

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    root = tmp_path_factory.mktemp("s3train")
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
                "DS_ACCELERATOR": "cpu", "SEEDLINE_NODE_CACHE": str(root / "node-cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in settings.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="train")
        cfg = validate_config({
            "name": "t", "workdir": str(root / "runs"),
            "stages": {"tokenize": {"input": str(_corpus(root / "corpus" / "a.jsonl")), "seq_len": 32,
                                    "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 400}},
                                    "val_fraction": 0.05}},
        })
        tok = Path(run_pipeline(cfg).stage_dirs["tokenize"])
        storage.upload_dir(tok, f"{BUCKET}/runs/tok")
        init_ray(None, 4)
        yield {"address": ray.get_runtime_context().gcs_address, "tok": tok, "tok_url": f"{BUCKET}/runs/tok",
               "settings": settings, "root": root}
        ray.shutdown()
    server.stop()


def _run(out: str, data: str, address: str, **changes):
    import logging

    from stages.pretrain.run import run

    ctx = StageContext(name="pretrain", out_dir=out, run_dir=out.rsplit("/", 1)[0], fingerprint="test",
                       inputs={"data": [handle("tokenize", data, "shards")]}, tracker=NullTracker(),
                       progress=Progress(storage.join(out, "progress.json")),
                       logger=logging.getLogger("test"), ray_address=address)
    return run(PretrainConfig(**_merge(PRETRAIN, changes)), ctx)


_RUNS: dict[str, object] = {}


def _pair(env) -> tuple[Path, str]:
    """The same pretrain run on local disk and on S3 (once per module)."""
    if not _RUNS:
        local = env["root"] / "local" / "pretrain"
        _RUNS["local_result"] = _run(str(local), str(env["tok"]), env["address"])
        _RUNS["s3_result"] = _run(f"{BUCKET}/runs/a/pretrain", env["tok_url"], env["address"])
        _RUNS["local"], _RUNS["s3"] = local, f"{BUCKET}/runs/a/pretrain"
    return _RUNS["local"], _RUNS["s3"]


def _s3_weights(url: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(f"{url}/model/model.safetensors"))


def test_s3_workdir_trains_exactly_like_local_disk(env):
    local, url = _pair(env)
    assert storage.read_bytes(f"{url}/metrics.jsonl") == (local / "metrics.jsonl").read_bytes()
    mine = _s3_weights(url)
    theirs = load_file(str(local / "model" / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # keep-last-k on the object store: only the newest two complete checkpoints remain
    assert storage.listdir(f"{url}/checkpoints") == ["step-4", "step-6"]
    assert storage.read_json(f"{url}/checkpoints/step-6/complete.json")["world_size"] == 2
    assert storage.exists(f"{url}/checkpoints/step-6/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert storage.exists(f"{url}/model/config.json") and storage.exists(f"{url}/model/README.md")
    io = _RUNS["s3_result"].io
    assert io["bytes_uploaded"] > 0 and io["bytes_downloaded"] > 0
    assert _RUNS["local_result"].io == {"bytes_downloaded": 0, "bytes_uploaded": 0, "cache_hits": 0}
    print(f"\npretrain on S3 moved: {io}")


def test_killed_s3_run_resumes_bitwise_from_s3_checkpoints(env):
    local, _ = _pair(env)
    out = f"{BUCKET}/runs/killed/pretrain"
    proc_env = {**os.environ, "PYTHONPATH": str(REPO), "SEEDLINE_TRAIN_KILL_AT_STEP": "4"}
    args = [out, env["tok_url"], env["address"], json.dumps(PRETRAIN)]
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], env=proc_env, cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 137, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert storage.exists(f"{out}/checkpoints/step-4/complete.json")
    assert not storage.exists(f"{out}/model/config.json")
    result = _run(out, env["tok_url"], env["address"])  # resumes from step 4, downloaded from S3
    assert result.steps == PRETRAIN["train"]["steps"]
    assert storage.read_bytes(f"{out}/metrics.jsonl") == (local / "metrics.jsonl").read_bytes()
    assert result.io["bytes_downloaded"] > 0  # the checkpoint came from S3


class Evil:
    """A pickle that writes a marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(env, tmp_path):
    out = tmp_path / "pretrain"
    _run(str(out), str(env["tok"]), env["address"], train={"steps": 2, "warmup": 1})
    marker = tmp_path / "PWNED"
    # the attacker replaces a DeepSpeed file of the newest complete checkpoint
    target = out / "checkpoints" / "step-2" / "mp_rank_00_model_states.pt"
    torch.save({"module": Evil(str(marker))}, target)
    with pytest.raises(SeedlineError, match="refused to load this checkpoint file"):
        _run(str(out), str(env["tok"]), env["address"], train={"steps": 4, "warmup": 1},
             scaling={"max_failures": 0})
    assert not marker.exists()
