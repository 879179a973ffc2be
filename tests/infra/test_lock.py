"""The pinned environment: requirements/lock.txt covers pyproject.toml's dependencies (all extras) with
exact, hashed pins and no CUDA packages, the installed environment matches it, and the Makefile's
set-up installs it."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_lock_pins_every_declared_dependency_with_hashes():
    pins = _lock()
    text = (REPO / "requirements" / "lock.txt").read_text()
    missing = _declared() - set(pins) - {"torch"}  # torch: the CPU build, installed before the lock
    assert not missing, f"not in requirements/lock.txt (run `make lock`): {sorted(missing)}"
    assert "torch" not in pins and not [n for n in pins if n.startswith("nvidia-") or n == "triton"]
    assert text.count("--hash=sha256:") >= len(pins)


def test_installed_versions_are_the_locked_ones():
    wrong = {}
    for name, pinned in _lock().items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue  # a package another machine kind needs is not required here
        if have != pinned:
            wrong[name] = (have, pinned)
    assert not wrong, f"installed != locked (re-run make .venv/.installed): {wrong}"
    assert version("torch").startswith("2.13.0")


def test_makefile_installs_the_lock():
    make = (REPO / "Makefile").read_text()
    rule = make[make.index(".venv/.installed:"):make.index("touch .venv/.installed")]
    assert "$(LOCK)" in rule.splitlines()[0] and "-r $(LOCK)" in rule and "--no-deps" in make
    assert "pip install -q pydantic" not in make  # nothing installed outside the lock
    assert "\nlock:" in make and "pip compile" in make
