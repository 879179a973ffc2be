"""Fuzz: broken configs (the kinds the issue found, and mutations of every key of ``configs/tiny.yaml``:
wrong types, unknown keys, bad globs, bad paths, non-UTF-8 bytes, directories). Each must exit 2 with one
``error:`` line naming the key path or the file, and no traceback. Most cases run through the CLI in this
process (the pre-flight fails before Ray starts, so each takes milliseconds); a handful run as real
processes."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.pipeline.preflight_helpers import assert_config_error, make_project, seedline, tiny

Case = tuple[str, Any, tuple[str, ...]]  # (id, config: a mapping, or raw bytes, or a directory marker), names


def _leaves(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def _mappings(node: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(node, dict):
        yield path
        for k, v in node.items():
            yield from _mappings(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _mappings(v, (*path, i))


def _key(path: tuple) -> str:
    out = ""
    for p in path:
        out += f".{p}" if out else str(p)
    return out


def _set(data: dict, path: tuple, value: Any) -> dict:
    data = copy.deepcopy(data)
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return data


def _wrong_type(value: Any) -> Any:
    """A value of a type the key does not take."""
    if isinstance(value, bool):
        return {"nested": "mapping"}
    if isinstance(value, int | float):
        return "not-a-number"
    if isinstance(value, str):
        return {"a": [1, 2]}
    if isinstance(value, list):
        return {"not": "a list"}
    return [[1]]


# Keys whose values are paths or globs (their mutations are "bad paths" rather than wrong types).
PATH_KEYS = {"stages.dedupe.input", "stages.sft.data", "stages.sft.val", "stages.dpo.data", "stages.dpo.val",
             "stages.evaluate.tasks.0.path", "stages.evaluate.prompts"}


def cases(workdir: str) -> list[Case]:
    base = tiny()
    base["workdir"] = workdir
    out: list[Case] = []
    for path, value in _leaves(base):
        key = _key(path)
        if key in ("name", "workdir"):
            continue
        out.append((f"type:{key}", _set(base, path, _wrong_type(value)), (key,)))
        if key in PATH_KEYS:
            out.append((f"glob:{key}", _set(base, path, "demo-data/nothing/*.jsonl"), (key,)))
            out.append((f"dir:{key}", _set(base, path, "demo-data"), (key,)))
    for path in _mappings(base):
        key = _key((*path, "no_such_key"))
        out.append((f"unknown:{key}", _set(base, (*path, "no_such_key"), 1), (key,)))
    for stage in base["stages"]:
        bad = _set(base, ("stages", stage), 7)
        out.append((f"scalar-section:{stage}", bad, (f"stages.{stage}",)))
    out += [
        ("unknown-stage", _set(base, ("stages", "pretrian"), {}), ("stages.pretrian",)),
        ("name-pattern", _set(base, ("name",), "../escape"), ("name",)),
        ("name-missing", {k: v for k, v in base.items() if k != "name"}, ("name",)),
        ("dedupe-input-missing", _set(base, ("stages", "dedupe"), {}), ("stages.dedupe.input",)),
        ("num-cpus-zero", _set(base, ("ray",), {"num_cpus": 0}), ("ray.num_cpus",)),
        ("tracking-type", _set(base, ("tracking",), "yes"), ("tracking",)),
        ("stages-list", _set(base, ("stages",), ["dedupe"]), ("stages",)),
        ("init-from-not-a-model", _set(base, ("stages", "pretrain", "init_from"), "demo-data"),
         ("stages.pretrain.init_from",)),
        ("init-from-beside-upstream", _set(base, ("stages", "sft", "init_from"), "demo-data/instruct"),
         ("stages.sft.init_from",)),
        ("workdir-is-a-file", _set(base, ("workdir",), "demo-data/instruct/train.jsonl"), ("workdir",)),
        ("workdir-under-a-file", _set(base, ("workdir",), "demo-data/eval/mc.jsonl/runs"), ("workdir",)),
        ("non-utf8", yaml.safe_dump(base).encode().replace(b"name: tiny", b"name: tiny\xff\xfe"),
         ("c.yaml",)),
        ("utf16", yaml.safe_dump(base).encode("utf-16"), ("c.yaml",)),
        ("binary", bytes(range(256)), ("c.yaml",)),
        ("yaml-syntax", b"name: tiny\nstages: {dedupe: [\n", ("c.yaml",)),
        ("yaml-tab", b"name: tiny\n\tworkdir: runs\n", ("c.yaml",)),
        ("top-level-list", b"- name: tiny\n", ("c.yaml",)),
        ("empty", b"", ("name",)),
        ("directory", "DIR", ("c.yaml",)),
    ]
    return out


def _random_mutations(base: dict, n: int, seed: int = 22) -> list[Case]:
    """Random wrong-type and unknown-key mutations of two keys at once (the first error is reported)."""
    rng = random.Random(seed)
    leaves = [(p, v) for p, v in _leaves(base) if _key(p) not in ("name", "workdir")]
    out = []
    for i in range(n):
        (p1, v1), (p2, v2) = rng.sample(leaves, 2)
        data = _set(_set(base, p1, _wrong_type(v1)), p2, _wrong_type(v2))
        out.append((f"random-{i}", data, (_key(p1), _key(p2))))
    return out


def _materialise(tmp: Path, case: Case) -> Path:
    _, content, _ = case
    cfg = tmp / "c.yaml"
    if cfg.is_dir():
        cfg.rmdir()
    elif cfg.exists():
        cfg.unlink()
    if content == "DIR":
        cfg.mkdir()
    elif isinstance(content, bytes):
        cfg.write_bytes(content)
    else:
        cfg.write_text(yaml.safe_dump(content, sort_keys=False))
    return cfg


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    make_project(root)
    return root


def test_at_least_fifty_broken_configs_each_fail_cleanly(project, monkeypatch):
    monkeypatch.chdir(project)
    base = tiny()
    base["workdir"] = str(project / "runs")
    all_cases = cases(str(project / "runs")) + _random_mutations(base, 20)
    assert len(all_cases) >= 50
    runner = CliRunner()
    failures = []
    for case in all_cases:
        cfg = _materialise(project, case)
        res = runner.invoke(app, ["plan", str(cfg)])
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        try:
            assert not crashed, f"{type(res.exception).__name__}: {res.exception}"
            assert_config_error(res.exit_code, res.output, *case[2])
        except AssertionError as e:
            failures.append(f"{case[0]}: {e}")
    assert not (project / "runs").exists(), "a broken config created the workdir"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case_id", ["non-utf8", "directory", "workdir-is-a-file", "glob:stages.sft.data",
                                     "type:stages.pretrain.train.steps", "unknown:stages.dpo.no_such_key"])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_broken_configs_as_real_processes(project, case_id, command, tmp_path):
    case = next(c for c in cases(str(project / "runs")) if c[0] == case_id)
    work = tmp_path / "p"
    work.mkdir()
    (work / "demo-data").symlink_to(project / "demo-data")
    cfg = _materialise(work, case)
    res = seedline(command, str(cfg), cwd=work)
    assert_config_error(res.returncode, res.stderr, *case[2])
    assert not (project / "runs").exists()
