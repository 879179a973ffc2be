"""``seedline compare``: one row per run (or per variant of a sweep) with its key numbers.

Per training instance the last ``loss`` and ``eval_loss`` and the tokens trained on (its
``metrics.jsonl``), per evaluated model every metric of the evaluate stage's ``results.json``, and the
run's wall time (first stage start to last stage end).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.state import read_status, recorded_stage_dirs

TRAINING_KEYS = ("loss", "eval_loss", "tokens")


def runs_of(paths: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``[(label, run dir, swept values)]``: a sweep directory stands for each of its variants."""
    from pipeline.sweep import read_index

    out = []
    for path in paths:
        path = storage.resolve(path)
        index = read_index(path)
        if index:
            out += [(v["name"], v["run_dir"], v["values"]) for v in index["variants"]]
        elif storage.exists(storage.join(path, "run.json")):
            out.append((path.rstrip("/").rsplit("/", 1)[-1], path, {}))
        else:
            raise ConfigError(path, "neither a run directory (run.json) nor a sweep (sweep.json)")
    return out


def _last_training(path: str) -> dict[str, float]:
    last: dict[str, float] = {}
    with storage.open_read(path, "r") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                last |= {k: v for k, v in rec.items() if k in TRAINING_KEYS and isinstance(v, int | float)}
    return last


def summary(run_dir: str) -> dict[str, Any]:
    """``{metric: value}`` of one run (see the module docstring); missing stages give no keys."""
    out: dict[str, Any] = {}
    starts, ends = [], []
    for name, d in recorded_stage_dirs(run_dir).items():
        st = read_status(d)
        if st.get("started"):
            starts.append(st["started"])
        if st.get("finished"):
            ends.append(st["finished"])
        metrics = storage.join(d, "metrics.jsonl")
        if storage.exists(metrics):
            out |= {f"{name}/{k}": v for k, v in _last_training(metrics).items()}
        results = storage.read_json_or(storage.join(d, "results.json"), None)
        if isinstance(results, dict) and isinstance(results.get("models"), dict):
            for model, vals in results["models"].items():
                out |= {f"{name}/{model}/{k}": v for k, v in vals.items()}
    if starts and ends:
        out["wall_s"] = round(max(ends) - min(starts), 1)
    return out


def table(paths: list[str]) -> list[dict[str, Any]]:
    """One row per run: ``{"run", "run_dir", "values", "metrics"}``."""
    return [{"run": label, "run_dir": d, "values": values, "metrics": summary(d)}
            for label, d, values in runs_of(paths)]


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table, one metric per line and one run per column (runs side by side)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["values"] if k not in keys]
    metrics: list[str] = []
    for r in rows:
        metrics += [m for m in r["metrics"] if m not in metrics]
    header = ["", *(r["run"] for r in rows)]
    lines = [[k, *(str(r["values"].get(k, "")) for r in rows)] for k in keys]
    lines += [[m, *(_fmt(r["metrics"].get(m)) for r in rows)] for m in metrics]
    widths = [max(len(str(c[i])) for c in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [header, *lines])


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
