"""The pre-flight: everything about a config that can be checked before any work starts.

``run``, ``resume``, ``submit`` and ``plan`` call ``check(cfg)`` after the config validated and before a
run directory, a tracking store or Ray is touched, so a mistake costs well under a second and is one
line naming the key path (exit 2), never a traceback from a stage minutes later.

The core knows no stage. A stage says what its fields hold by marking them in its config model
(``Field(..., json_schema_extra=GLOBS)`` and the like, found in nested models and lists too):

- ``GLOBS``: input glob(s) (a string or a list): each must match at least one file;
- ``MODEL_DIR``: a Hugging Face model directory (``config.json`` plus safetensors weights), unless the
  value names another stage instance of the pipeline;
- ``FILE``: one existing file;
- ``TOKENIZER``: a ``tokenizer.json`` or a directory holding one.

``EVAL_DATA`` (combined with one of the above: ``json_schema_extra={**FILE, **EVAL_DATA}``) marks a field
holding evaluation data (evaluate's tasks and prompts, sft's and dpo's ``val``): the runner collects those
paths for the whole pipeline (``eval_data``) and hands them to every stage, e.g. for decontamination.

The core checks the rest: the workdir (and the run directory) is a directory or can be created, and the
recorded ``run.json`` and stage ``status.json`` files are readable JSON. Stages that already succeeded
are not checked (their inputs may be gone; nothing will read them again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline import storage
from pipeline.errors import ConfigError, CorruptFile

PREFLIGHT_KEY = "preflight"
GLOBS = {PREFLIGHT_KEY: "globs"}
MODEL_DIR = {PREFLIGHT_KEY: "model_dir"}
FILE = {PREFLIGHT_KEY: "file"}
TOKENIZER = {PREFLIGHT_KEY: "tokenizer"}
EVAL_DATA_KEY = "eval_data"
EVAL_DATA = {EVAL_DATA_KEY: True}


def check(cfg: Any, local_paths: bool = True) -> None:
    """Raise ``ConfigError`` (key path or file, one line) for the first problem found in ``cfg``.

    ``local_paths=False`` (a submission to another machine) leaves local input paths unchecked: the
    cluster may see files this machine does not. URLs and the workdir are checked either way.
    """
    check_workdir(cfg.workdir, cfg.name)
    read_run_json(cfg.run_dir())
    done = _succeeded(cfg)
    names = set(cfg.stage_configs())
    for name, model in cfg.stage_configs().items():
        if name not in done:
            for path, kind, value in marked_fields(model, f"stages.{name}"):
                _check_value(path, kind, value, names, local_paths)


def marked_fields(model: BaseModel, prefix: str, key: str = PREFLIGHT_KEY) -> list[tuple[str, str, Any]]:
    """``(key path, kind, value)`` of every field of ``model`` marked with ``key`` (nested models and
    lists too)."""
    out: list[tuple[str, str, Any]] = []
    for fname, info in type(model).model_fields.items():
        value = getattr(model, fname)
        path = f"{prefix}.{fname}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if key in extra:
            out.append((path, str(extra[key]), value))
        elif isinstance(value, BaseModel):
            out += marked_fields(value, path, key)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += marked_fields(item, f"{path}.{i}", key)
    return out


def eval_data(configs: dict[str, BaseModel]) -> dict[str, list[str]]:
    """The pipeline's evaluation data: ``{"<instance>.<key path>": [path or glob, ...]}`` of every field
    marked ``EVAL_DATA`` that holds a value, over all stage instances (``configs``: instance -> config)."""
    out: dict[str, list[str]] = {}
    for name, model in configs.items():
        for path, _kind, value in marked_fields(model, name, EVAL_DATA_KEY):
            values = [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, str)]
            if values:
                out[path] = values
    return out


def _check_value(path: str, kind: str, value: Any, instances: set[str], local_paths: bool) -> None:
    if value is None:
        return
    values = [value] if isinstance(value, str) else list(value)
    for v in values:
        if not isinstance(v, str) or (not local_paths and not storage.is_url(v)):
            continue
        try:
            _CHECKS[kind](path, v, instances)
        except ConfigError:
            raise
        except (OSError, ValueError, ImportError) as e:  # fsspec: no credentials, no bucket, bad URL
            raise ConfigError(path, f"cannot read {v!r}: {_first_line(e)}") from None


def _check_globs(path: str, pattern: str, _instances: set[str]) -> None:
    matches = storage.glob(pattern)
    if not matches:
        raise ConfigError(path, f"no input file matches {pattern!r}")
    local = [storage.local(m) for m in matches]
    if all(p is not None and p.is_dir() for p in local):
        raise ConfigError(path, f"{pattern!r} matches only directories; name the files "
                                f"(e.g. {pattern}/*.jsonl)")


def _check_model_dir(path: str, value: str, instances: set[str]) -> None:
    if value in instances:  # bound to another stage instance's model, not a path
        return
    if not storage.exists(value):
        raise ConfigError(path, f"{value} does not exist (expected a Hugging Face model directory)")
    config = storage.join(value, "config.json")
    if not storage.exists(config):
        raise ConfigError(path, f"{value} is not a Hugging Face model directory (no config.json)")
    try:
        if not isinstance(json.loads(storage.read_bytes(config)), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"{config} is not a valid model config: {_first_line(e)}") from None
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any(storage.exists(storage.join(value, w)) for w in weights):
        raise ConfigError(path, f"{value} has no model.safetensors or model.safetensors.index.json "
                                "(only safetensors weights are read)")


def _check_file(path: str, value: str, _instances: set[str]) -> None:
    p = storage.local(value)
    if p is not None and p.is_dir():
        raise ConfigError(path, f"{value} is a directory, not a file")
    if not storage.exists(value):
        raise ConfigError(path, f"file not found: {value}")


def _check_tokenizer(path: str, value: str, _instances: set[str]) -> None:
    p = storage.local(value)
    if p is not None and p.is_dir() and not (p / "tokenizer.json").is_file():
        raise ConfigError(path, f"{value} is a directory without tokenizer.json")
    if not storage.exists(value):
        raise ConfigError(path, f"not found: {value} (expected tokenizer.json or a directory holding one)")


_CHECKS = {"globs": _check_globs, "model_dir": _check_model_dir, "file": _check_file,
           "tokenizer": _check_tokenizer}


def check_workdir(workdir: str, name: str) -> None:
    """The workdir and ``<workdir>/<name>`` are directories, or can be created (local paths)."""
    root = storage.local(workdir)
    if root is None:
        return
    for key, p in (("workdir", root), ("name", root / name)):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(key, f"{p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(key, f"{p} is not writable")
            continue
        parent = _existing_parent(p)
        if not parent.is_dir():
            raise ConfigError(key, f"cannot create {p}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(key, f"cannot create {p}: {parent} is not writable")
        return  # the rest will be created under it


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def read_json_file(path: str, default: Any = None) -> Any:
    """A JSON file Seedline wrote, ``default`` when missing; anything else is a ``CorruptFile`` naming it."""
    try:
        return storage.read_json_or(path, default)
    except CorruptFile:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFile(path, _first_line(e)) from None
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror or _first_line(e)}") from None


def read_run_json(run_dir: str, required: bool = False) -> dict[str, Any] | None:
    """``<run_dir>/run.json`` (None when absent and not ``required``); a corrupt one is a one-line
    ``CorruptFile`` error naming the file."""
    path = storage.join(run_dir, "run.json")
    data = read_json_file(path, None)
    if data is None:
        if required:
            raise ConfigError("RUN_DIR", f"no run.json in {run_dir}")
        return None
    if not isinstance(data, dict) or ("config" in data and not isinstance(data["config"], dict)):
        raise CorruptFile(path, "not a Seedline run record (expected a JSON object with a config)")
    return data


def resumable_config(run_dir: str) -> dict[str, Any]:
    """The config recorded in ``run.json``, refused when credentials were redacted out of it."""
    from pipeline.redact import holds_mask

    data = read_run_json(run_dir, required=True)
    config = data.get("config")
    if not isinstance(config, dict):
        raise CorruptFile(storage.join(run_dir, "run.json"), "no config recorded")
    masked = holds_mask(config)
    if masked:
        raise ConfigError(masked, f"holds a credential that was not stored in {run_dir}/run.json; run the "
                                  "config file again with `seedline run CONFIG` (credentials are never "
                                  "written to the run directory)")
    return config


def _succeeded(cfg: Any) -> set[str]:
    """Instances whose output is already complete (their status files are checked for corruption)."""
    from pipeline.graph import order
    from pipeline.state import RunState

    state = RunState(cfg.run_dir())
    done = set()
    for node in order(cfg):
        status = read_json_file(storage.join(state.stage_dir(node.dirname), "status.json"), {})
        if isinstance(status, dict) and status.get("state") == "succeeded":
            done.add(node.name)
    return done


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def one_line(text: str) -> str:
    """An error message as one line (YAML and fsspec errors span several)."""
    return " ".join(str(text).split())
