"""The few lines ``seedline run`` prints at the end: per stage what happened and how it did on its own
target (the stage type's ``verdict`` hook), then what to do next (open MLflow, write the report, load the
final model)."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.state import read_status, recorded_stage_dirs


def verdicts(run_dir: str, dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """``{instance: Verdict or None}``: each finished stage judged by its type's ``verdict`` hook."""
    from pipeline import stage as stage_registry
    from pipeline.report import stage_types

    dirs = dirs if dirs is not None else recorded_stage_dirs(run_dir)
    types = stage_types(storage.read_json_or(storage.join(run_dir, "run.json"), {}) or {})
    out: dict[str, Any] = {}
    for name, d in dirs.items():
        spec = stage_registry.registry().get(types.get(name, name))
        hook = spec.verdict if spec is not None else None
        done = hook and read_status(d)["state"] == "succeeded"
        out[name] = stage_registry._load(hook)(d) if done else None
    return out


def _n(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def describe(v: Any) -> str:
    """One line: ``target before -> after (note)``."""
    if v is None:
        return ""
    move = f"{_n(v.before)} -> {_n(v.after)}" if v.before is not None else _n(v.after)
    return f"{v.target} {move}".strip() + (f" ({v.note})" if v.note else "")


def final_model(run_dir: str, dirs: dict[str, str]) -> str | None:
    """The exported model of the last stage (in pipeline order) that has one."""
    for d in reversed(list(dirs.values())):
        if storage.exists(storage.join(d, "model", "config.json")):
            return storage.join(d, "model")
    return None


def summary_lines(run_dir: str, outcomes: dict[str, str]) -> list[str]:
    """Per stage ``name  outcome  seconds  key number``, then the next commands."""
    dirs = recorded_stage_dirs(run_dir)
    judged = verdicts(run_dir, dirs)
    lines = [f"run {run_dir}:"]
    for name, d in dirs.items():
        st = read_status(d)
        took = (st.get("finished") or 0) - (st.get("started") or 0)
        secs = f"{took:7.1f}s" if st.get("finished") and st.get("started") else " " * 8
        outcome = outcomes.get(name, st["state"])
        lines.append(f"  {name:12s} {outcome:8s} {secs}  {describe(judged[name])}".rstrip())
    lines += ["next:", f"  seedline ui {run_dir}        # MLflow: runs, metrics, models",
              f"  seedline report {run_dir}    # one HTML page: stages, data, curves, evaluation"]
    model = final_model(run_dir, dirs)
    if model:
        lines += _load_lines(model)
    return lines


def _load_lines(model: str) -> list[str]:
    """How to load the final model in transformers; one on an object store is copied here first
    (``from_pretrained`` reads local directories and the Hub only)."""
    out = []
    if storage.is_url(model):
        local = model.rstrip("/").split("/")[-2] + "-model"
        out.append(f"  python -c \"import fsspec; fsspec.core.url_to_fs('{model}')[0].get('{model}', "
                   f"'{local}', recursive=True)\"")
        model = local
    out.append(f"  python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
               f"m = AutoModelForCausalLM.from_pretrained('{model}'); "
               f"t = AutoTokenizer.from_pretrained('{model}')\"")
    return out


def print_summary(run_dir: str, outcomes: dict[str, Any], echo) -> None:
    for line in summary_lines(run_dir, outcomes):
        echo(line)
