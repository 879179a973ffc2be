"""Stage registry and the context a stage runs with.

A stage is a name, a pydantic config model, a version string, the stages it consumes, and a top-level
``run(config, ctx)`` function. The function is named by an import path ("pkg.module:func") so that the
core can validate configs, fingerprint and plan without importing torch or ray.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline import storage
from pipeline.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def volatile(default: Any = None, **kwargs: Any) -> Any:
    """A config field that does not change results (log intervals, display): left out of fingerprints."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["volatile"] = True
    return Field(default, json_schema_extra=extra, **kwargs)


@dataclass(frozen=True)
class StageSpec:
    """What the registry knows about a stage.

    ``consumes`` are stages that must be present in the pipeline; ``uses`` are consumed when present
    (tokenize reads dedupe's output if dedupe runs, else its own input). ``check`` may raise
    ``ConfigError`` for cross-stage rules (e.g. sft needs pretrain or ``init_from``).
    """

    name: str
    config_model: type[BaseModel]
    version: str
    run: str
    consumes: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    check: Callable[[BaseModel, set[str]], None] | None = None

    def inputs(self, present: set[str]) -> list[str]:
        """Upstream stage names this stage reads in a pipeline made of ``present`` stages."""
        return [s for s in self.consumes] + [s for s in self.uses if s in present]

    def load_run(self) -> Callable[[Any, StageContext], Any]:
        module, _, func = self.run.partition(":")
        return getattr(importlib.import_module(module), func)


_REGISTRY: dict[str, StageSpec] = {}
_LOADED = False


def register(
    name: str,
    config: type[BaseModel],
    version: str,
    run: str,
    consumes: tuple[str, ...] = (),
    uses: tuple[str, ...] = (),
    check: Callable[[BaseModel, set[str]], None] | None = None,
) -> StageSpec:
    """Register a stage. Called at import time by stage packages (see ``stages/__init__.py``)."""
    spec = StageSpec(name, config, version, run, tuple(consumes), tuple(uses), check)
    _REGISTRY[name] = spec
    return spec


def registry() -> dict[str, StageSpec]:
    """All registered stages, loading them once from the ``seedline.stages`` entry points and from the
    modules named in ``SEEDLINE_STAGE_MODULES`` (comma-separated: a project's own stages, no packaging)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from importlib.metadata import entry_points

        eps = entry_points(group="seedline.stages")
        names = sorted({ep.value for ep in eps} or {"stages"})
        names += [m.strip() for m in os.environ.get("SEEDLINE_STAGE_MODULES", "").split(",") if m.strip()]
        for mod in names:
            importlib.import_module(mod)
    return _REGISTRY


def get(name: str) -> StageSpec:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"stages.{name}", f"unknown stage; known stages: {', '.join(sorted(reg))}")
    return reg[name]


@dataclass(frozen=True)
class Upstream:
    """A finished upstream stage as seen by a consumer."""

    name: str
    out_dir: str
    fingerprint: str
    config: dict[str, Any]


class Progress:
    """Progress of a stage: written to ``progress.json`` (atomic, throttled) from any process.

    The driver folds it into ``status.json`` and shows it as a progress bar. It is picklable, so a Ray
    worker (e.g. training rank 0) can report progress too.
    """

    def __init__(self, path: str | None, min_interval: float = 1.0):
        self.path = path
        self.min_interval = min_interval
        self._last = 0.0
        self.state: dict[str, Any] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "min_interval": self.min_interval, "_last": 0.0, "state": {},
                "listeners": []}

    def update(self, force: bool = False, **fields: Any) -> None:
        """Set fields such as ``done``, ``total``, ``unit``, ``step``, ``eta_s``."""
        self.state.update(fields)
        self.state["updated"] = time.time()
        for cb in self.listeners:
            cb(self.state)
        now = time.monotonic()
        if self.path and (force or now - self._last >= self.min_interval):
            self._last = now
            storage.write_json(self.path, self.state)


@dataclass
class StageContext:
    """Everything a stage's ``run`` gets besides its own config."""

    name: str
    out_dir: str
    run_dir: str
    fingerprint: str
    upstream: dict[str, Upstream]
    tracker: Any  # pipeline.tracking.Tracker or NullTracker
    progress: Progress
    logger: logging.Logger
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        """A path inside the stage's output directory."""
        return storage.join(self.out_dir, *parts)

    def init_ray(self) -> None:
        """Connect to the configured Ray cluster, or start a local one bound to 127.0.0.1."""
        from pipeline.ray_init import init_ray

        init_ray(self.ray_address, self.ray_num_cpus)
