"""Stage scaling maps to Ray resources; a stage asking for more than the cluster can ever provide fails
early with a message naming the key to change."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from pydantic import BaseModel

from cluster import package
from cluster.client import connect
from cluster.jobs import logs, wait
from cluster.resources import check_resources, scaling_config_kwargs
from pipeline.errors import ConfigError


class Scaling(BaseModel):  # the shape training stages use
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1


def test_scaling_maps_to_ray_train_resources():
    assert scaling_config_kwargs(Scaling(num_workers=4, use_gpu=True, cpus_per_worker=8)) == {
        "num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 8.0, "GPU": 1.0}}
    assert scaling_config_kwargs({"num_workers": 2}) == {
        "num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}


def test_requests_within_the_cluster_pass():
    check_resources("pretrain", Scaling(num_workers=2, use_gpu=True, cpus_per_worker=4), {"CPU": 8, "GPU": 2})
    check_resources("sft", {"num_workers": 2, "cpus_per_worker": 1}, {"CPU": 2})


def test_too_many_gpus_fail_with_the_key_to_change():
    with pytest.raises(ConfigError) as e:
        check_resources("pretrain", Scaling(num_workers=8, use_gpu=True), {"CPU": 64, "GPU": 4})
    assert e.value.path == "stages.pretrain.scaling"
    assert "asks for 8 GPUs (8 workers x 1) but the cluster can provide at most 4" in str(e.value)
    with pytest.raises(ConfigError, match="at most 0"):
        check_resources("dpo", Scaling(num_workers=1, use_gpu=True), {"CPU": 2})
    with pytest.raises(ConfigError, match=r"asks for 12 CPUs \(3 workers x 4\)"):
        check_resources("sft", Scaling(num_workers=3, cpus_per_worker=4), {"CPU": 8})


CHECK = """
import json
from cluster.resources import check_resources, read_cluster_resources
from pipeline.ray_init import init_ray
init_ray(None)  # inside a job: attaches to the job's cluster, as a stage's ctx.init_ray() does
have = read_cluster_resources()
print("RESOURCES", json.dumps({k: have[k] for k in ("CPU", "GPU") if k in have}))
check_resources("pretrain", {"num_workers": 2, "cpus_per_worker": 1}, have)
print("FITS")
check_resources("pretrain", {"num_workers": 2, "use_gpu": True}, have)
"""


def test_a_job_on_the_cluster_fails_early_when_gpus_can_never_be_had(ray_head, monkeypatch):
    """In a real job: the helper reads the cluster's resources (2 CPUs, no GPU; an autoscaling
    cluster's declared maximum raises them) and the check stops a GPU request with a clear message."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    client = connect(ray_head.address)
    with tempfile.TemporaryDirectory() as tmp:
        wd = package.build_working_dir(Path(tmp) / "wd", package.project_root(), {"check.py": CHECK})
        first = client.submit_job(entrypoint="python check.py", runtime_env={"working_dir": str(wd)})
        declared = client.submit_job(entrypoint="python check.py", runtime_env={
            "working_dir": str(wd), "env_vars": {"SEEDLINE_MAX_RESOURCES": '{"CPU": 64, "GPU": 8}'}})
    assert wait(client, first, timeout=120) == "FAILED"
    out = logs(client, first)
    assert json.loads(out.split("RESOURCES ", 1)[1].splitlines()[0]) == {"CPU": 2.0}
    assert "FITS" in out
    assert ("stages.pretrain.scaling: asks for 2 GPUs (2 workers x 1) but the cluster can provide at "
            "most 0") in out
    assert wait(client, declared, timeout=120) == "SUCCEEDED", logs(client, declared)
    assert '"GPU": 8.0' in logs(client, declared)


def test_an_elastic_stage_needs_its_minimum_and_asks_ray_for_the_range():
    elastic = {"num_workers": {"min": 1, "max": 4}, "cpus_per_worker": 2}
    assert scaling_config_kwargs(elastic)["num_workers"] == (1, 4)
    check_resources("pretrain", elastic, {"CPU": 2})  # starts on one worker, grows when nodes come
    with pytest.raises(ConfigError, match=r"asks for 4 CPUs \(2 workers x 2\)"):
        check_resources("pretrain", {"num_workers": {"min": 2, "max": 4}, "cpus_per_worker": 2}, {"CPU": 2})


def test_custom_worker_resources_are_asked_for_and_checked():
    pinned = {"num_workers": 2, "resources": {"trainer": 1}}
    assert scaling_config_kwargs(pinned)["resources_per_worker"] == {"CPU": 1.0, "trainer": 1.0}
    check_resources("pretrain", pinned, {"CPU": 3, "trainer": 2})
    with pytest.raises(ConfigError, match=r"asks for 2 of resource 'trainer' \(2 workers x 1\).*at most 1"):
        check_resources("pretrain", pinned, {"CPU": 3, "trainer": 1})
