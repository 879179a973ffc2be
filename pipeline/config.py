"""The pipeline config: one YAML file, validated into pydantic models.

The core knows only the top level; each stage's section is validated by the config model that stage
registered. Every error names the key path (``stages.tokenize.seq_len: must be > 0, got -1``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from pipeline import stage as stage_registry
from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.stage import StrictModel


class TrackingConfig(StrictModel):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<workdir>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Ray cluster address; null starts a local Ray on 127.0.0.1")
    num_cpus: int | None = Field(None, gt=0)


class PipelineConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    workdir: str = "runs"
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    stages: dict[str, Any] = Field(default_factory=dict)
    max_parallel_stages: int | None = Field(
        None, ge=1, description="sweep variants run at the same time (default: one per local CPU)")
    _stage_models: dict[str, BaseModel] = PrivateAttr(default_factory=dict)
    _instances: dict[str, Any] = PrivateAttr(default_factory=dict)

    def stage_configs(self) -> dict[str, BaseModel]:
        """Validated stage configs by instance name, in file order (filled by ``validate_config``)."""
        return self._stage_models

    def instances(self) -> dict[str, Any]:
        """``{name: pipeline.binding.Instance}`` in file order (filled by ``validate_config``)."""
        return self._instances

    def run_dir(self) -> str:
        return storage.join(self.workdir, self.name)

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        local = storage.local(self.workdir)
        if local is None:
            raise ConfigError("tracking.uri", "required when workdir is a URL (e.g. an MLflow server)")
        return f"sqlite:///{local / 'mlflow.db'}"



def _describe(err: dict[str, Any]) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    text = msg[0].lower() + msg[1:] if msg else kind
    text = text.replace("input should be", "must be").replace("greater than", ">").replace("less than", "<")
    text = text.replace("value error, ", "")
    if value is not None and not isinstance(value, dict | list):
        text += f", got {value!r}"
    return text


_KEY_FIRST = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$", re.S)


def _raise_validation(prefix: str, e: ValidationError) -> None:
    """The first error as a ``ConfigError`` naming its key path. Union tags starting with ``~`` are not
    keys and are left out; a model validator that names a nested key first (``"scaling.num_workers:
    ..."``) gets that key appended to the path."""
    err = e.errors()[0]
    parts = [str(p) for p in (prefix, *err["loc"]) if p != "" and not str(p).startswith("~")]
    text = _describe(err)
    m = _KEY_FIRST.match(text)
    if m:
        parts.append(m.group(1))
        text = m.group(2)
    raise ConfigError(".".join(parts), text) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw config mapping."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(override,
                          "override must look like key.path=value (e.g. stages.tokenize.seq_len=512)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"override value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(key, f"cannot set a key inside {where}, which is a {type(nxt).__name__}")
        node = nxt
    node[parts[-1]] = value


def validate_config(data: Any) -> PipelineConfig:
    """Raw mapping -> PipelineConfig: every stage instance validated by its type's config model, its
    inputs bound (``pipeline.binding``) and the cross-stage checks run."""
    from pipeline.binding import Instance, Section, bind, split_section

    if not isinstance(data, dict):
        raise ConfigError("", "the config file must be a YAML mapping (name, workdir, stages, ...)")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        _raise_validation("", e)
    sections: dict[str, Section] = {}
    for name, raw in cfg.stages.items():
        type_, explicit, inputs, own = split_section(name, raw)
        spec = stage_registry.get(type_, f"stages.{name}.type" if explicit else None)
        try:
            model = spec.config_model.model_validate(own)
        except ValidationError as e:
            _raise_validation(f"stages.{name}", e)
        sections[name] = Section(name, type_, spec, model, inputs)
    bound = bind(sections)
    instances = {n: Instance(n, s.type, s.spec, s.config, bound[n]) for n, s in sections.items()}
    for inst in instances.values():
        if inst.spec.check:
            try:
                inst.spec.check(inst.config, {k: list(v) for k, v in inst.bound.items()})
            except ConfigError as e:
                raise ConfigError(e.path.replace(f"stages.{inst.type}", f"stages.{inst.name}", 1)
                                  if inst.type != inst.name else e.path, e.message) from None
    cfg._instances = instances
    cfg._stage_models = {n: i.config for n, i in instances.items()}
    cfg.workdir = storage.resolve(cfg.workdir)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's raw mapping; a missing file, bad YAML or a non-mapping is a ``ConfigError``."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(str(p), "is a directory; pass the config file (a .yaml file)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), f"is not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read the config file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(p), "is not valid YAML: " + " ".join(str(e).split())) from None
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), "the config file must be a YAML mapping (name, workdir, stages, ...)")
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML file, apply ``-s`` overrides, validate (a file with a ``sweep:`` section is run with
    ``load_sweep``)."""
    data = load_raw(path, overrides)
    if data.get("sweep"):
        raise ConfigError("sweep", "this command takes one pipeline; a sweep runs with `seedline run`")
    data.pop("sweep", None)
    return validate_config(data)


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file's raw mapping with ``-s`` overrides applied (not validated)."""
    data = read_yaml(path)
    for o in overrides:
        apply_override(data, o)
    return data


def resolved(cfg: PipelineConfig) -> dict[str, Any]:
    """The full config with defaults filled in, as stored in ``run.json``."""
    out = cfg.model_dump(mode="json", exclude={"stages"})
    out["workdir"] = storage.resolve(cfg.workdir)
    out["stages"] = {}
    for name, inst in cfg.instances().items():
        section = {"type": inst.type} if inst.type != name else {}
        section["inputs"] = {slot: list(v) for slot, v in inst.bound.items() if v}
        out["stages"][name] = section | inst.config.model_dump(mode="json")
    return out
