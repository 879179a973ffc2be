"""Stage scaling -> Ray resources, checked against what the cluster can ever provide.

A stage's ``scaling`` (``num_workers``, ``use_gpu``, ``cpus_per_worker``) becomes a Ray Train
``ScalingConfig``. A request the cluster can never satisfy would otherwise wait forever for resources;
``check_resources`` turns it into a config error before any work starts.

What a cluster "can ever provide" is the total of its nodes now, raised by ``SEEDLINE_MAX_RESOURCES``
(a JSON object such as ``{"GPU": 16, "CPU": 128}``) for an autoscaling cluster whose GPU workers are not
up yet: the infra manifests set it to the worker groups' maximum.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.errors import ConfigError, SeedlineError

MAX_ENV = "SEEDLINE_MAX_RESOURCES"


def _field(scaling: Any, name: str, default: Any) -> Any:
    value = scaling.get(name, default) if isinstance(scaling, dict) else getattr(scaling, name, default)
    return default if value is None else value


def worker_range(scaling: Any) -> tuple[int, int]:
    """``(min, max)`` workers: a count ``n`` is ``(n, n)``; an elastic ``{min, max}`` its bounds."""
    n = _field(scaling, "num_workers", 1)
    if isinstance(n, int):
        return n, n
    lo, hi = (n.get("min"), n.get("max")) if isinstance(n, dict) else (n.min, n.max)
    return int(lo), int(hi)


def per_worker(scaling: Any) -> dict[str, float]:
    """Resources one training worker asks for."""
    res = {"CPU": float(_field(scaling, "cpus_per_worker", 1))}
    if _field(scaling, "use_gpu", False):
        res["GPU"] = float(_field(scaling, "gpus_per_worker", 1))
    res |= {str(k): float(v) for k, v in (_field(scaling, "resources", {}) or {}).items()}
    return res


def scaling_config_kwargs(scaling: Any) -> dict[str, Any]:
    """Keyword arguments for ``ray.train.ScalingConfig``."""
    lo, hi = worker_range(scaling)
    return {
        "num_workers": lo if lo == hi else (lo, hi),
        "use_gpu": bool(_field(scaling, "use_gpu", False)),
        "resources_per_worker": per_worker(scaling),
    }


def required(scaling: Any) -> dict[str, float]:
    """Total resources the workers of a stage need to start (an elastic stage: its minimum)."""
    n = worker_range(scaling)[0]
    return {k: v * n for k, v in per_worker(scaling).items()}


def declared_max() -> dict[str, float]:
    """``SEEDLINE_MAX_RESOURCES`` as a dict (empty when unset)."""
    raw = os.environ.get(MAX_ENV, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, TypeError) as e:
        raise ConfigError(MAX_ENV, f'must be a JSON object like {{"GPU": 8, "CPU": 64}}, got {raw!r} ({e})') \
            from None


def read_cluster_resources() -> dict[str, float]:
    """The most the connected Ray cluster can provide: its nodes' totals now, or the declared maximum
    of an autoscaling cluster when that is larger. Ray must be initialised (``ctx.init_ray()``)."""
    import ray

    if not ray.is_initialized():
        raise SeedlineError("read_cluster_resources: connect to Ray first (ctx.init_ray())")
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    for k, v in declared_max().items():
        total[k] = max(total.get(k, 0.0), v)
    return total


def check_resources(stage_name: str, scaling: Any, cluster_resources: dict[str, float]) -> None:
    """Raise ``ConfigError`` (naming the stage's ``scaling`` keys) if the stage needs more CPUs, GPUs or
    custom resources (``scaling.resources``) than ``cluster_resources`` holds in total."""
    need = required(scaling)
    n = worker_range(scaling)[0]
    custom = [(k, f"of resource {k!r}") for k in need if k not in ("GPU", "CPU")]
    for kind, unit in (("GPU", "GPUs"), ("CPU", "CPUs"), *custom):
        want = need.get(kind, 0.0)
        have = float(cluster_resources.get(kind, 0.0))
        if want <= have:
            continue
        each = per_worker(scaling)[kind]
        fix = {"GPU": "lower num_workers, set use_gpu: false, or add GPU workers",
               "CPU": "lower num_workers or cpus_per_worker, or add nodes"}.get(
            kind, f"check scaling.resources, or start nodes with `ray start --resources '{{\"{kind}\": 1}}'`")
        raise ConfigError(
            f"stages.{stage_name}.scaling",
            f"asks for {want:g} {unit} ({n} workers x {each:g}) but the cluster can provide at most "
            f"{have:g} (its nodes' total; an autoscaling cluster declares its maximum in {MAX_ENV}); {fix}",
        )
