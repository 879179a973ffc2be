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


def added(default: Any = None, **kwargs: Any) -> Any:
    """A config field added after stage outputs already exist: left out of fingerprints while it holds
    its default, so existing store entries stay valid (a changed value still re-runs the stage)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["omit_default"] = True
    return Field(default, json_schema_extra=extra, **kwargs)


def volatile(default: Any = None, **kwargs: Any) -> Any:
    """A config field that does not change results (log intervals, display): left out of fingerprints."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["volatile"] = True
    return Field(default, json_schema_extra=extra, **kwargs)


@dataclass(frozen=True)
class InputSlot:
    """An input a stage type needs: a ``kind`` of output (``documents``, ``shards``, ``tokenizer``,
    ``model``, ``preference_pairs``, ...) from another stage instance.

    Binding, in order: the instance's ``inputs:`` (a list of instance names, or ``{slot: name(s)}``);
    else the stage config's ``config_key`` when its value names an instance (``init_from: small``; a
    value that is not an instance name, such as a path, leaves the slot unbound); else, when ``auto``, the
    single instance of the first type in ``prefer`` that has one (any provider of the kind when ``prefer``
    is empty; every provider when ``many``). Several candidates are a config error naming them.
    """

    kind: str
    required: bool = True
    many: bool = False
    prefer: tuple[str, ...] = ()
    config_key: str | None = None
    auto: bool = True


@dataclass(frozen=True)
class Verdict:
    """A finished stage judged on what it is for: ``target`` (e.g. "held-out answer loss") went from
    ``before`` to ``after`` (either may be None), ``better`` says which direction is progress ("lower",
    "higher" or "" when neither applies); ``note`` is one short sentence of context."""

    target: str
    before: float | None = None
    after: float | None = None
    better: str = ""
    note: str = ""

    @property
    def improved(self) -> bool | None:
        if self.before is None or self.after is None or not self.better:
            return None
        return self.after < self.before if self.better == "lower" else self.after > self.before


@dataclass(frozen=True)
class StageSpec:
    """What the registry knows about a stage type: its config model, version, ``run`` function, the
    ``inputs`` it needs (slots) and the ``outputs`` it declares (``{kind: path inside its directory}``,
    "" for the directory itself). Only the producing stage's package knows that layout; consumers get
    ``Output`` handles. ``check(config, bound)`` may raise ``ConfigError`` for rules across stages, with
    ``bound`` = ``{slot: [instance, ...]}``. ``report`` names a function ("pkg.module:func") that returns
    this stage's section of ``report.html``; ``verdict`` one that judges a finished stage directory on its
    own target (``Verdict``), for the end-of-run summary and the report's first table.
    """

    name: str
    config_model: type[BaseModel]
    version: str
    run: str
    inputs: dict[str, InputSlot] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    check: Callable[[BaseModel, dict[str, list[str]]], None] | None = None
    report: str | None = None
    verdict: str | None = None

    def load_run(self) -> Callable[[Any, StageContext], Any]:
        return _load(self.run)


def _load(target: str) -> Callable[..., Any]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


_REGISTRY: dict[str, StageSpec] = {}
_LOADED = False


def register(
    name: str,
    config: type[BaseModel],
    version: str,
    run: str,
    inputs: dict[str, InputSlot] | None = None,
    outputs: dict[str, str] | None = None,
    check: Callable[[BaseModel, dict[str, list[str]]], None] | None = None,
    report: str | None = None,
    verdict: str | None = None,
    consumes: tuple[str, ...] = (),
    uses: tuple[str, ...] = (),
) -> StageSpec:
    """Register a stage type. Called at import time by stage packages (see ``stages/__init__.py``).

    ``consumes``/``uses`` are shorthands for a project's simple stages: an input slot per named type
    (required / optional) whose kind is that type's whole output directory (``stage:<type>``).
    """
    slots = dict(inputs or {})
    for dep in consumes:
        slots[dep] = InputSlot(f"stage:{dep}", required=True, prefer=(dep,))
    for dep in uses:
        slots[dep] = InputSlot(f"stage:{dep}", required=False, prefer=(dep,))
    outs = {f"stage:{name}": "", **(outputs or {})}
    spec = StageSpec(name, config, version, run, slots, outs, check, report, verdict)
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


def get(name: str, key: str | None = None) -> StageSpec:
    """The registered stage type ``name``; unknown types are a ``ConfigError`` at ``key``."""
    reg = registry()
    if name not in reg:
        raise ConfigError(key or f"stages.{name}",
                          f"unknown stage type {name!r}; known types: {', '.join(sorted(reg))}")
    return reg[name]


@dataclass(frozen=True)
class Output:
    """A typed handle on one declared output of a finished upstream stage instance: ``path`` is where
    that output lives (a directory or a file, per the producer's declaration); ``config`` is the
    producer's resolved config; ``inputs`` the producer's own input bindings."""

    kind: str
    path: str
    instance: str
    type: str
    fingerprint: str
    config: dict[str, Any]
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the producer's own bindings


def handle(type_name: str, stage_dir: str, kind: str, instance: str | None = None, fingerprint: str = "",
           config: dict[str, Any] | None = None, inputs: dict[str, tuple[str, ...]] | None = None) -> Output:
    """The ``kind`` output of a ``type_name`` stage whose directory is ``stage_dir``, at the path that
    type declared (used by the runner, and by tests that run a stage on its own)."""
    rel = get(type_name).outputs[kind]
    return Output(kind, storage.join(stage_dir, rel) if rel else stage_dir, instance or type_name, type_name,
                  fingerprint, dict(config or {}), dict(inputs or {}))


class Progress:
    """Progress of a stage: written to ``progress.json`` (atomic, throttled) from any process.

    The driver folds it into ``status.json`` and shows it as a progress bar. It is picklable, so a Ray
    worker (e.g. training rank 0) can report progress too. Each update also feeds the stage's live health
    (``pipeline.health``: pace, token rate, loss spikes) under ``rules``.
    """

    def __init__(self, path: str | None, min_interval: float = 1.0, rules: Any = None):
        from pipeline.health import HealthRules, Observer

        self.path = path
        self.min_interval = min_interval
        self._last = 0.0
        self.state: dict[str, Any] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.rules = rules or HealthRules()
        self._observer = Observer(self.rules)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "min_interval": self.min_interval, "rules": self.rules}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["min_interval"], state["rules"])

    def set_rules(self, rules: Any) -> None:
        """Use a stage's own health thresholds (``pipeline.health.HealthRules``)."""
        from pipeline.health import Observer

        self.rules = rules
        self._observer = Observer(rules)

    def update(self, force: bool = False, **fields: Any) -> None:
        """Set fields such as ``done``, ``total``, ``unit``, ``step``, ``eta_s``, ``tokens``, ``loss``."""
        now = time.time()
        self.state.update(fields)
        self.state["updated"] = now
        self._observer.observe(self.state, fields, now)
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
    inputs: dict[str, list[Output]]  # slot -> bound outputs, in binding order
    tracker: Any  # pipeline.tracking.Tracker or NullTracker
    progress: Progress
    logger: logging.Logger
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    lineage: dict[str, str] = field(default_factory=dict)  # every upstream instance -> fingerprint
    type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # the runner's "upstream": {instance: {type, config}}
    # the pipeline's evaluation data, every instance's (fields marked EVAL_DATA): "<instance>.<key path>"
    # -> paths or globs; e.g. the filter's decontamination reads it
    eval_data: dict[str, list[str]] = field(default_factory=dict)

    def input(self, slot: str) -> Output | None:
        """The output bound to a single-valued input slot, or None when the slot is unbound."""
        bound = self.inputs.get(slot) or []
        return bound[0] if bound else None

    def input_list(self, slot: str) -> list[Output]:
        """Every output bound to a slot (a ``many`` slot such as evaluate's models)."""
        return list(self.inputs.get(slot) or [])

    def path(self, *parts: str) -> str:
        """A path inside the stage's output directory."""
        return storage.join(self.out_dir, *parts)

    def init_ray(self) -> None:
        """Connect to the configured Ray cluster, or start a local one bound to 127.0.0.1."""
        from pipeline.ray_init import init_ray

        init_ray(self.ray_address, self.ray_num_cpus)
