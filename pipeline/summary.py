"""The few lines ``seedline run`` prints at the end: per stage what happened and its key number, then
what to do next (open MLflow, write the report, load the final model)."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.state import read_status, recorded_stage_dirs


def _key_number(d: str) -> str:
    """The one number that says what a stage did, from the files stages write by convention."""
    stats = storage.read_json_or(storage.join(d, "stats.json"), None)
    if isinstance(stats, dict) and "docs_in" in stats and "docs_out" in stats:
        return f"kept {stats['docs_out']:,} of {stats['docs_in']:,} documents"
    manifest = storage.read_json_or(storage.join(d, "manifest.json"), None)
    if isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict):
        tokens = sum(int(s.get("stream_tokens") or 0) for s in manifest["splits"].values())
        if tokens:
            return f"{tokens:,} tokens"
    results = storage.read_json_or(storage.join(d, "results.json"), None)
    if isinstance(results, dict) and results.get("models"):
        reg = results.get("registered") or {}
        best = f", registered {reg['stage']} as {reg['uri']}" if reg.get("uri") else ""
        return f"{len(results['models'])} models evaluated{best}"
    from pipeline.compare import _last_training

    metrics = storage.join(d, "metrics.jsonl")
    if storage.exists(metrics):
        last = _last_training(metrics)
        parts = [f"{k} {last[k]:.4g}" for k in ("loss", "eval_loss") if k in last]
        return ", ".join(parts)
    return ""


def final_model(run_dir: str, dirs: dict[str, str]) -> str | None:
    """The exported model of the last stage (in pipeline order) that has one."""
    for d in reversed(list(dirs.values())):
        if storage.exists(storage.join(d, "model", "config.json")):
            return storage.join(d, "model")
    return None


def summary_lines(run_dir: str, outcomes: dict[str, str]) -> list[str]:
    """Per stage ``name  outcome  seconds  key number``, then the next commands."""
    dirs = recorded_stage_dirs(run_dir)
    lines = [f"run {run_dir}:"]
    for name, d in dirs.items():
        st = read_status(d)
        took = (st.get("finished") or 0) - (st.get("started") or 0)
        secs = f"{took:7.1f}s" if st.get("finished") and st.get("started") else " " * 8
        lines.append(f"  {name:12s} {outcomes.get(name, st['state']):8s} {secs}  {_key_number(d)}".rstrip())
    lines += ["next:", f"  seedline ui {run_dir}        # MLflow: runs, metrics, models",
              f"  seedline report {run_dir}    # one HTML page: stages, data, curves, evaluation"]
    model = final_model(run_dir, dirs)
    if model:
        lines.append(f"  python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
                     f"m = AutoModelForCausalLM.from_pretrained('{model}'); "
                     f"t = AutoTokenizer.from_pretrained('{model}')\"")
    return lines


def print_summary(run_dir: str, outcomes: dict[str, Any], echo) -> None:
    for line in summary_lines(run_dir, outcomes):
        echo(line)
