"""Stage instances and how their inputs are bound to other instances (see ``InputSlot``).

``stages:`` maps an instance name to its section; ``type:`` (default: the instance name) names the stage
type and ``inputs:`` optionally names upstream instances. Both keys belong to the pipeline, not to the
stage's config model, and are taken out before the section is validated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from pipeline.errors import ConfigError
from pipeline.stage import InputSlot, StageSpec

INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Instance:
    """One stage instance of a pipeline: its name, type, validated config and bound inputs."""

    name: str
    type: str
    spec: StageSpec
    config: BaseModel
    bound: dict[str, tuple[str, ...]]

    @property
    def deps(self) -> tuple[str, ...]:
        """Upstream instances, each once, in slot order."""
        return tuple(dict.fromkeys(n for names in self.bound.values() for n in names))


@dataclass(frozen=True)
class Section:
    """A stage section split into the pipeline's keys and the stage's own config."""

    name: str
    type: str
    spec: StageSpec
    config: BaseModel
    inputs: Any  # None, a list of instance names, or {slot: name or [names]}


def split_section(name: str, section: Any) -> tuple[str, bool, Any, dict[str, Any]]:
    """(type, type given explicitly, raw inputs, the stage's own keys) of ``stages.<name>``."""
    if not INSTANCE_NAME.match(name):
        raise ConfigError(f"stages.{name}", "instance names are letters, digits, '_', '.', '-'")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"stages.{name}", f"must be a mapping of the stage's keys, got {section!r}")
    own = dict(section)
    type_ = own.pop("type", None)
    if type_ is not None and not isinstance(type_, str):
        raise ConfigError(f"stages.{name}.type", f"must be a stage type name, got {type_!r}")
    return type_ or name, type_ is not None, own.pop("inputs", None), own


def bind(sections: dict[str, Section]) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{instance: {slot: (upstream instances)}}``; an unknown, unfit, ambiguous or missing binding is a
    ``ConfigError`` naming the key and the candidates."""
    providers: dict[str, list[str]] = {}
    for s in sections.values():
        for kind in s.spec.outputs:
            providers.setdefault(kind, []).append(s.name)
    return {s.name: _bind_one(s, sections, providers) for s in sections.values()}


def _bind_one(s: Section, sections: dict[str, Section], providers: dict[str, list[str]],
              ) -> dict[str, tuple[str, ...]]:
    explicit = _explicit(s, sections)
    out: dict[str, tuple[str, ...]] = {}
    for slot, spec in s.spec.inputs.items():
        if slot in explicit:
            names = explicit[slot]
        elif spec.config_key and (names := _from_config(s, slot, spec, sections)) is not None:
            pass
        elif spec.auto:
            names = _auto(s, slot, spec, sections, providers)
        else:
            names = []
        if spec.required and not names:
            kinds = [t for t, sec in sections.items() if spec.kind in sec.spec.outputs and t != s.name]
            raise ConfigError(f"stages.{s.name}",
                              f"needs a '{spec.kind}' input ({slot}); "
                              + (f"name one of {', '.join(kinds)} in stages.{s.name}.inputs" if kinds else
                                 f"add a stage of type {' or '.join(_types_providing(spec.kind))}"))
        out[slot] = tuple(names)
    return out


def _types_providing(kind: str) -> list[str]:
    from pipeline.stage import registry

    return sorted(t for t, spec in registry().items() if kind in spec.outputs) or ["(none registered)"]


def _explicit(s: Section, sections: dict[str, Section]) -> dict[str, list[str]]:
    """The bindings written in ``stages.<name>.inputs``."""
    key = f"stages.{s.name}.inputs"
    raw = s.inputs
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        out: dict[str, list[str]] = {}
        for item in raw:
            up = _known(item, key, s, sections)
            slots = [slot for slot, spec in s.spec.inputs.items() if spec.kind in up.spec.outputs]
            if not slots:
                wants = ", ".join(f"{slot} ({spec.kind})" for slot, spec in s.spec.inputs.items()) or "none"
                raise ConfigError(key, f"{item!r} (type {up.type}) provides none of the inputs of a "
                                       f"{s.type} stage: {wants}")
            for slot in slots:
                out.setdefault(slot, []).append(item)
        return out
    if isinstance(raw, dict):
        out = {}
        for slot, names in raw.items():
            if slot not in s.spec.inputs:
                raise ConfigError(f"{key}.{slot}", f"a {s.type} stage has no input {slot!r}; inputs: "
                                                   f"{', '.join(s.spec.inputs) or 'none'}")
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list):
                raise ConfigError(f"{key}.{slot}", "must be an instance name or a list of them")
            for n in names:
                _check_provides(_known(n, f"{key}.{slot}", s, sections), s.spec.inputs[slot],
                                f"{key}.{slot}")
            out[slot] = list(names)
        return out
    raise ConfigError(key, "must be a list of instance names or a mapping {input: instance}")


def _known(name: Any, key: str, s: Section, sections: dict[str, Section]) -> Section:
    if not isinstance(name, str) or name not in sections or name == s.name:
        others = ", ".join(n for n in sections if n != s.name)
        raise ConfigError(key, f"{name!r} is not another stage instance of this pipeline; "
                               f"instances: {others}")
    return sections[name]


def _check_provides(up: Section, spec: InputSlot, key: str) -> None:
    if spec.kind not in up.spec.outputs:
        raise ConfigError(key, f"{up.name!r} (type {up.type}) does not output '{spec.kind}'")


def _from_config(s: Section, slot: str, spec: InputSlot, sections: dict[str, Section]) -> list[str] | None:
    """Instances named by the config key ``spec.config_key``; None when the key is unset (or holds a
    value that names no instance, e.g. a directory: the stage then reads it itself)."""
    value = getattr(s.config, spec.config_key or "", None)
    if value is None:
        return None
    key = f"stages.{s.name}.{spec.config_key}"
    values = list(value) if isinstance(value, dict | list) else [value]
    named = [v for v in values if isinstance(v, str) and v in sections]
    if isinstance(value, dict) and len(named) != len(values):  # {instance: weight}: keys are instances
        strangers = [v for v in values if v not in named]
        others = ", ".join(n for n in sections if n != s.name)
        raise ConfigError(key, f"{strangers} are not stage instances of this pipeline; instances: {others}")
    if not named:
        return [] if isinstance(value, list) else None
    if len(named) != len(values):
        strangers = [v for v in values if v not in named]
        raise ConfigError(key, f"{strangers} are not instances of this pipeline")
    for n in named:
        _check_provides(_known(n, key, s, sections), spec, key)
    return named


def _auto(s: Section, slot: str, spec: InputSlot, sections: dict[str, Section],
          providers: dict[str, list[str]]) -> list[str]:
    candidates = [n for n in providers.get(spec.kind, []) if n != s.name]
    if spec.many:
        return candidates
    if spec.prefer:
        for t in spec.prefer:
            of_type = [n for n in candidates if sections[n].type == t]
            if of_type:
                candidates = of_type
                break
        else:
            candidates = []
    if len(candidates) > 1:
        raise ConfigError(f"stages.{s.name}.inputs",
                          f"the {slot} input ('{spec.kind}') is ambiguous: candidates "
                          f"{', '.join(candidates)}; name one, e.g. inputs: [{candidates[-1]}]")
    return candidates
