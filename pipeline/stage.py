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
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline import storage
from pipeline.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, and a partial nested block keeps the
    declaring model's defaults.

    A field whose default is a model instance built with explicit values (a stage's own defaults, e.g.
    dpo's ``train: TrainConfig = TrainConfig(lr=1e-6, ...)``) is merged key by key, at every nesting
    level, under what the user wrote: ``train: {steps: 200}`` keeps dpo's ``lr``, not the class default
    of ``TrainConfig``. A model whose fields are alternatives (one of ``path`` or ``train``) sets
    ``merge_defaults = False``: a given block then replaces the default whole.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    merge_defaults: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _merge_declared_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged: dict[str, Any] | None = None
        for name, info in cls.model_fields.items():
            given = data.get(name)
            if not isinstance(given, dict) or info.is_required():
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, StrictModel) and type(default).merge_defaults:
                # The fields the declaration set, each whole (a nested instance given there is part of it).
                declared = {k: v for k, v in default.model_dump().items() if k in default.model_fields_set}
                if declared:
                    merged = merged if merged is not None else dict(data)
                    merged[name] = deep_merge(declared, given)
        return data if merged is None else merged


def deep_merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``given`` on top, recursively for keys whose values are mappings on both sides."""
    out = dict(base)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
