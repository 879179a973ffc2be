"""The job entrypoint runs the driver from a private copy of the working directory: Ray replaces its
unpacked copy (``rmtree`` + unzip) whenever another node sharing the temp dir sets up the job's
environment, and a driver whose current directory was deleted dies at its first torch import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster import job_entry

REPO = Path(__file__).resolve().parents[2]
# What Ray's working_dir plugin does on another node (overwrite=True), then what pretrain does first.
DRIVER = """
import os, shutil, sys
wd = os.environ["RAY_WD"]
shutil.rmtree(wd); os.makedirs(wd)
import torch
print(float((torch.ones(16, 16) @ torch.ones(16, 16)).sum()), os.getcwd() != wd)
"""


def _wd(tmp_path: Path) -> Path:
    wd = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    (wd / ".seedline-job").mkdir(parents=True)
    (wd / ".seedline-job" / "demo.yaml").write_text("name: demo\n")
    return wd


def _run(cmd: list[str], wd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_WD=str(wd), PYTHONPATH=f"{wd}{os.pathsep}{REPO}")
    return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_driver_whose_working_dir_is_replaced_dies_in_torch_import(tmp_path):
    """The failure the entrypoint exists for, as it showed on a 3-node cluster on one machine."""
    wd = _wd(tmp_path)
    plain = _run([sys.executable, "-c", DRIVER], wd)
    assert plain.returncode != 0
    assert "Cannot load" in plain.stdout + plain.stderr and "libtorch_cpu" in plain.stdout + plain.stderr


def test_the_job_entrypoint_survives_the_replacement_and_cleans_up(tmp_path):
    wd = _wd(tmp_path)
    wrapped = _run([sys.executable, "-m", "cluster.job_entry", sys.executable, "-c", DRIVER], wd)
    assert wrapped.returncode == 0, wrapped.stderr[-3000:]
    assert wrapped.stdout.split() == ["4096.0", "True"]


def test_the_snapshot_holds_the_config_and_python_path_points_to_it(tmp_path):
    wd = _wd(tmp_path)
    copy = job_entry.snapshot(wd)
    assert (copy / ".seedline-job" / "demo.yaml").read_text() == "name: demo\n"
    env = job_entry._env_for(wd, copy)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(copy)
    assert str(wd) not in env["PYTHONPATH"].split(os.pathsep)


def test_no_command_is_a_usage_error(capsys):
    assert job_entry.main([]) == 2
    assert "usage" in capsys.readouterr().err
