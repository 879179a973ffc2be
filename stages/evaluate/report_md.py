"""``results.md``: the models side by side, one row per metric, the best value of each row in bold."""

from __future__ import annotations

import math
from typing import Any

LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "answer_loss")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def baselines(
    tasks: list[tuple[str, list[Any]]], pairs: int, answers: int = 0
) -> dict[str, dict[str, float]]:
    """Chance level and sample size of every accuracy: a task's ``acc``/``acc_norm`` (mean of 1 / choices
    over its scored examples) and the preference accuracies (a coin flip over ``pairs``); the sample size
    of the answer loss (held-out sft examples)."""
    out: dict[str, dict[str, float]] = {}
    for name, examples in tasks:
        chance = sum(1 / len(ex.choices) for ex in examples) / len(examples)
        for m in ("acc", "acc_norm"):
            out[f"{name}/{m}"] = {"chance": round(chance, 4), "n": len(examples)}
    if pairs:
        for m in ("pref_accuracy", "pref_logp_accuracy"):
            out[m] = {"chance": 0.5, "n": pairs}
    if answers:
        out["answer_loss"] = {"n": answers}
    return out


def metric_label(metric: str, base: dict[str, dict[str, float]] | None = None) -> str:
    """``metric ↑`` (or ↓), with ``(chance C, n N)`` after an accuracy."""
    label = f"{metric} {'↓' if lower_is_better(metric) else '↑'}"
    b = (base or {}).get(metric)
    if b and "chance" in b:
        return f"{label} (chance {b['chance']:.2f}, n {b['n']})"
    return f"{label} (n {b['n']})" if b else label


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if math.isnan(v):
        return "nan"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def results_markdown(
    models: dict[str, dict[str, float]], counts: dict[str, Any], registered: dict[str, Any] | None = None,
    base: dict[str, dict[str, float]] | None = None,
) -> str:
    """The comparison table plus what was scored and what was registered."""
    stages = list(models)
    metrics: list[str] = []
    for vals in models.values():
        metrics += [m for m in vals if m not in metrics]
    lines = ["# Evaluation", "", "| metric | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for m in metrics:
        vals = [models[s].get(m) for s in stages]
        real = [v for v in vals if v is not None and not math.isnan(v)]
        best = (min(real) if lower_is_better(m) else max(real)) if len(real) > 1 else None
        cells = [f"**{_fmt(v)}**" if best is not None and v == best else _fmt(v) for v in vals]
        lines.append(f"| {metric_label(m, base)} | " + " | ".join(cells) + " |")
    lines += ["", "Scored: " + ", ".join(f"{k} {v}" for k, v in _flat(counts).items()) + "."]
    if registered:
        lines += [
            "",
            f"Registered: `{registered['uri']}` (version {registered['version']}) = the "
            f"{registered['stage']} model: {why(registered)}.",
        ]
    return "\n".join(lines) + "\n"


def why(registered: dict[str, Any]) -> str:
    """Why a model was registered (``registered.json`` of older runs has no ``why``: rebuilt)."""
    if registered.get("why"):
        return registered["why"]
    return f"best by {registered.get('metric')} ({_fmt(registered.get('value'))})"


def _flat(counts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in counts.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k} "))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out
