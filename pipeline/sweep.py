"""Sweeps: one config file expanded into variants (the cross product of ``sweep:`` values).

```yaml
sweep:
  stages.pretrain.train.lr: [1.0e-3, 3.0e-3]
  stages.pretrain.model.preset: [tiny, 125m]
```

Each variant is an ordinary run named ``<name>.<leaf><value>...`` (``tiny.lr0.001``) in the same workdir,
so stages whose config and inputs are the same in every variant (dedupe, tokenize) have one store entry
and run once; the leases make a second variant wait for the first instead of computing it again.
Variants run at the same time, up to ``max_parallel`` at once. ``<workdir>/<name>/sweep.json`` lists them
for ``seedline compare`` and ``seedline report``. In MLflow every variant is its own parent run in the
sweep's experiment, tagged ``seedline.sweep`` and ``seedline.sweep.<key>``.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import storage
from pipeline.config import PipelineConfig, apply_override, validate_config
from pipeline.errors import ConfigError

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Variant:
    """One point of a sweep: its run name, the swept values and the validated config."""

    name: str
    values: dict[str, Any]
    config: PipelineConfig


def parse_cli(items: list[str]) -> dict[str, list[Any]]:
    """``--sweep KEY=V1,V2`` (values parsed as YAML) -> ``{KEY: [V1, V2]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"--sweep {item}", "must look like key.path=v1,v2 (e.g. "
                                                 "stages.pretrain.train.lr=1e-3,3e-3)")
        try:
            out[key.strip()] = [yaml.safe_load(v) for v in raw.split(",")]
        except yaml.YAMLError as e:
            raise ConfigError(f"--sweep {key}", f"a value is not valid YAML: {e}") from None
    return out


def sweep_of(data: dict[str, Any], cli: dict[str, list[Any]] | None = None) -> dict[str, list[Any]]:
    """The sweep of a raw config (its ``sweep:`` section, then ``--sweep`` options); removes the section."""
    raw = data.pop("sweep", None) or {}
    if not isinstance(raw, dict):
        raise ConfigError("sweep", "must be a mapping {key.path: [values]}")
    out = {**raw, **(cli or {})}
    for key, values in out.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}", "must be a non-empty list of values")
        if key.split(".")[0] in ("name", "workdir", "sweep"):
            raise ConfigError(f"sweep.{key}", "name and workdir cannot be swept")
    return out


def _slug(key: str, value: Any) -> str:
    text = f"{key.rsplit('.', 1)[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "v"


def expand(data: dict[str, Any], sweep: dict[str, list[Any]]) -> list[Variant]:
    """Every combination of the swept values as a validated config; a bad value names its key."""
    keys = list(sweep)
    variants = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        variant = copy.deepcopy(data)
        for key, value in values.items():
            apply_override(variant, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        base = data.get("name", "run")
        variant["name"] = ".".join([base, *(_slug(k, v) for k, v in values.items())])
        variant.setdefault("tracking", {})
        if isinstance(variant["tracking"], dict) and not variant["tracking"].get("experiment"):
            variant["tracking"]["experiment"] = base
        try:
            cfg = validate_config(variant)
        except ConfigError as e:
            raise ConfigError(e.path, f"{e.message} (sweep variant {values})") from None
        variants.append(Variant(variant["name"], values, cfg))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError("sweep", f"two variants get the same run name: {names}")
    return variants


def default_parallel(variants: list[Variant]) -> int:
    """Variants at once: as many as the local CPUs (or ``ray.num_cpus``) allow, one CPU each at least."""
    cpus = variants[0].config.ray.num_cpus or os.cpu_count() or 1
    return max(1, min(len(variants), cpus))


def write_index(sweep_dir: str, sweep: dict[str, list[Any]], variants: list[Variant]) -> None:
    """``sweep.json``: the sweep's keys and each variant's values and run directory."""
    storage.makedirs(sweep_dir)
    storage.write_json(storage.join(sweep_dir, SWEEP_FILE), {
        "sweep": sweep, "created": time.time(),
        "variants": [{"name": v.name, "values": v.values, "run_dir": v.config.run_dir()} for v in variants],
    })


def read_index(path: str) -> dict[str, Any] | None:
    """A sweep directory's ``sweep.json``, or None when ``path`` is not a sweep."""
    return storage.read_json_or(storage.join(path, SWEEP_FILE), None)


def run_sweep(variants: list[Variant], sweep_id: str, max_parallel: int,
              show: Callable[[str], None]) -> dict[str, Any]:
    """Run every variant (``max_parallel`` at once); ``{variant: RunResult or the exception}``."""
    from pipeline.runner import run_pipeline

    lock = threading.Lock()

    def one(v: Variant):
        def say(msg: str) -> None:
            with lock:
                show(f"[{v.name}] {msg}")

        tags = {"seedline.sweep": sweep_id} | {f"seedline.sweep.{k}": str(x) for k, x in v.values.items()}
        return run_pipeline(v.config, show=say, tags=tags)

    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="seedline-variant") as pool:
        futures = {v.name: pool.submit(one, v) for v in variants}
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as e:  # reported per variant below; the others keep their results
                results[name] = e
    return results
