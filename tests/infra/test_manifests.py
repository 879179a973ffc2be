"""The infra files parse, and hold what Seedline relies on: token auth, a CPU and a GPU group that
autoscale, S3 credentials from a Secret, the declared maximum matching the groups, and one Ray version
everywhere (the installed one: a job client and a cluster on different Ray versions do not mix)."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import ray
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
SECRET_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}"
    return docs[0]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _quantity(value: str | int) -> float:
    return float(str(value))


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["authOptions"]["mode"] == "token", f"{where}: token auth must be on"
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: autoscaling"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: no public head Service"
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head runs drivers only"
    head_c = _containers(head)[0]
    assert {"name": "dashboard", "containerPort": 8265} in [
        {"name": p["name"], "containerPort": p["containerPort"]} for p in head_c["ports"]]

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values()
                  if "nvidia.com/gpu" in _containers(g)[0]["resources"].get("limits", {})]
    cpu_groups = [g for g in groups.values() if g not in gpu_groups]
    assert gpu_groups and cpu_groups, f"{where}: needs a CPU group and a GPU group"
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']}"
    for g in gpu_groups:
        assert g["minReplicas"] == 0, f"{where}: GPU workers scale from zero"
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{where}: GPU taint toleration"

    # Every Ray container gets the S3 credentials from a Secret, never as literal values.
    all_containers = [head_c] + [c for g in groups.values() for c in _containers(g)]
    for c in all_containers:
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert "seedline-s3" in refs, f"{where}: {c['name']} lacks the S3 credentials Secret"
        for e in c.get("env", []):
            assert not (e["name"] in SECRET_NAMES and "value" in e), f"{where}: literal secret {e['name']}"
        assert c["image"] == head_c["image"], f"{where}: one image for all Ray containers"

    # The maximum the stages check their scaling against equals what the groups can scale to.
    declared = json.loads(next(e["value"] for e in head_c["env"] if e["name"] == "SEEDLINE_MAX_RESOURCES"))
    limits = [(g["maxReplicas"], _containers(g)[0]["resources"]["limits"]) for g in groups.values()]
    assert declared["GPU"] == sum(n * _quantity(lim.get("nvidia.com/gpu", 0)) for n, lim in limits), where
    assert declared["CPU"] == sum(n * _quantity(lim["cpu"]) for n, lim in limits), where


def _gib(quantity: str) -> float:
    units = {"Gi": 1, "Ti": 1024, "Mi": 1 / 1024}
    number, unit = re.fullmatch(r"(\d+)(Gi|Ti|Mi)", quantity).groups()
    return float(number) * units[unit]


def _check_node_cache(spec: dict, where: str) -> None:
    """Every Ray pod has a node-local cache volume (emptyDir or hostPath: never shared storage) mounted
    where SEEDLINE_NODE_CACHE points, with the shard cache limit below the volume's size."""
    from stages.lm.node_cache import CACHE_ENV
    from stages.lm.shard_cache import LIMIT_ENV

    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            name = f"{where}: {g.get('groupName', 'head')}/{c['name']}"
            assert CACHE_ENV in env, f"{name}: no {CACHE_ENV}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert env[CACHE_ENV] in mounts, f"{name}: {CACHE_ENV} is not a mounted volume"
            volume = volumes[mounts[env[CACHE_ENV]]]
            assert "emptyDir" in volume or "hostPath" in volume, f"{name}: the cache must be node-local"
            size = (volume.get("emptyDir") or {}).get("sizeLimit")
            assert size, f"{name}: a sizeLimit keeps a full cache from evicting the pod unannounced"
            assert float(env[LIMIT_ENV]) < _gib(size), f"{name}: {LIMIT_ENV} must stay below {size}"


def test_every_ray_pod_has_a_node_local_cache():
    _check_node_cache(_one(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")["spec"], "raycluster.yaml")
    job = _one(INFRA / "kuberay" / "rayjob.yaml", "RayJob")
    _check_node_cache(job["spec"]["rayClusterSpec"], "rayjob.yaml")


def test_vm_nodes_mount_a_node_local_cache():
    from stages.lm.node_cache import CACHE_ENV
    from stages.lm.shard_cache import LIMIT_ENV

    cfg = yaml.safe_load((INFRA / "vm" / "cluster.yaml").read_text())
    opts = " ".join(cfg["docker"]["run_options"])
    cache = re.search(rf"-e {CACHE_ENV}=(\S+)", opts).group(1)
    assert re.search(rf"-v /\S+:{re.escape(cache)}\b", opts), "the cache is a directory of the instance"
    limit = float(re.search(rf"-e {LIMIT_ENV}=(\S+)", opts).group(1))
    for name, t in cfg["available_node_types"].items():
        disks = t["node_config"].get("BlockDeviceMappings", [])
        if t["resources"].get("GPU"):
            assert disks and limit < disks[0]["Ebs"]["VolumeSize"], f"{name}: disk smaller than the cache"


def test_raycluster_has_token_auth_autoscaling_and_gpu_group():
    cluster = _one(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")


def test_rayjob_runs_seedline_on_a_secured_cluster_and_cleans_up():
    job = _one(INFRA / "kuberay" / "rayjob.yaml", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("seedline run ")
    assert "-s workdir=s3://" in spec["entrypoint"], "the workdir must be on shared storage"
    config = spec["entrypoint"].split()[2]
    assert config.startswith("/opt/seedline/"), "configs are baked into the image"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env.get("env_vars"), dict)
    assert not set(runtime_env["env_vars"]) & set(SECRET_NAMES), "secrets belong in Secrets"
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0
    _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def test_dockerfile_pins_the_tested_versions_and_builds_deepspeed_ops():
    text = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "devel" in args["CUDA_IMAGE"]
    assert args["RAY_VERSION"] == ray.__version__
    assert args["DEEPSPEED_VERSION"] == version("deepspeed")
    assert args["MLFLOW_VERSION"] == version("mlflow")
    for op in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "DS_BUILD_UTILS=1"):
        assert op in text
    assert "ds_report" in text, "the build must fail when an op did not compile"
    assert re.search(r'pip install "?\.\[s3\]', text), "the project itself is installed"
    assert re.search(r"^USER ray$", text, flags=re.M), "runs as a non-root user"
    ignore = [line for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*", "only sources enter the image"
    for needed in ("!pipeline/", "!stages/", "!cluster/", "!pyproject.toml"):
        assert needed in ignore


def test_cluster_launcher_config_is_token_secured_with_gpu_workers():
    cfg = yaml.safe_load((INFRA / "vm" / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "a GPU worker type"
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    assert all(t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    # Token on every node, auth on for every `ray start`, dashboard on loopback (SSH tunnel).
    assert any(src.endswith(".ray/auth_token") for src in cfg["file_mounts"].values())
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start
    declared = json.loads(re.search(r"SEEDLINE_MAX_RESOURCES='([^']+)'", head_start).group(1))
    for kind in ("CPU", "GPU"):
        assert declared[kind] == sum(t["max_workers"] * t["resources"].get(kind, 0) for t in workers.values())
    inbound = cfg["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in inbound] == [(22, 22)], "only SSH from outside"
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in inbound for r in p["IpRanges"])
    assert cfg["docker"]["image"] == "ghcr.io/your-org/seedline:0.1.0"


def test_mlflow_compose_has_postgres_s3_store_and_basic_auth():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # Passwords come from .env and are required (`:?`): no default password ships.
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[key]), key
    assert re.search(r"\$\{\w+:\?", services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("${MLFLOW_BIND:-127.0.0.1}:") for p in ports), "loopback by default"
    assert set(mlflow["depends_on"]) == {"postgres", "create-bucket"}
    server_image = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={version('mlflow')}" in server_image and "mlflow[auth]" in server_image
    entry = (INFRA / "mlflow" / "entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entry and "--serve-artifacts" in entry
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()
