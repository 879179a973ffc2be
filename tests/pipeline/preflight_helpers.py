"""A project directory holding ``configs/tiny.yaml`` and stand-ins for the files it names (the pre-flight
checks that inputs exist, not what they hold), and a way to run the CLI in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
INPUTS = ("demo-data/corpus/part-0.jsonl.gz", "demo-data/instruct/train.jsonl",
          "demo-data/instruct/val.jsonl", "demo-data/prefs/train.jsonl", "demo-data/prefs/val.jsonl",
          "demo-data/eval/mc.jsonl",
          "demo-data/eval/prompts.jsonl")


def make_project(root: Path) -> Path:
    """``root`` with the tiny config's input files; returns the config path (workdir inside ``root``)."""
    for rel in INPUTS:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('{"text": "x"}\n')
    data = tiny()
    data["workdir"] = str(root / "runs")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def model_dir(path: Path, config: bool = True, weights: bool = True) -> Path:
    """A directory shaped like a Hugging Face model (only the files the pre-flight looks for)."""
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 2048}))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    return path


def seedline(*args: str, cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    """The CLI as a real process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_config_error(code: int, text: str, *names: str) -> str:
    """Exit 2, one ``error:`` line naming one of ``names`` (key path or file), no traceback."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}: {text[-2000:]}"
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line, got: {lines}"
    assert any(n in errors[0] for n in names), f"{errors[0]!r} names none of {names}"
    return errors[0]
