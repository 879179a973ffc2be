"""Content addresses for stage outputs: ``<stage>-<first 10 hex of sha256(version, config, upstream)>``.

Fields marked ``volatile`` (logging intervals, display) are left out, so changing them re-runs nothing;
fields marked ``added`` (introduced after outputs existed) are left out while they hold their default.
The stage's code is not hashed: a behaviour change is signalled by bumping the stage's version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def result_fields(model: BaseModel) -> dict[str, Any]:
    """The model as JSON data without volatile fields (recursively)."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("volatile"):
            continue
        value = _plain(getattr(model, name))
        if extra.get("omit_default") and value == _plain(info.get_default(call_default_factory=True)):
            continue  # a field added later, at its default: old fingerprints stay valid
        out[name] = value
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "fingerprint_value"):  # a value that stands for something narrower (WorkerRange)
        return _plain(value.fingerprint_value())
    if isinstance(value, BaseModel):
        return result_fields(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def stage_fingerprint(version: str, model: BaseModel, upstream: dict[str, object], type_: str = "",
                      neutral: set[str] | frozenset[str] = frozenset()) -> str:
    """First 10 hex digits of sha256 over the stage type and version, its result fields and the
    fingerprints of its inputs by slot. ``neutral`` config keys name upstream instances (``init_from:
    small``): the instance's fingerprint stands for them, its name does not (renaming an instance must not
    invalidate its consumers)."""
    config = result_fields(model)
    for key in neutral:
        if key in config:
            config[key] = "<input>"
    payload = {"type": type_, "version": version, "config": config,
               "upstream": dict(sorted(upstream.items()))}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
