"""The job's working directory: the project's source and the config, never environments, runs,
caches or secrets files."""

from __future__ import annotations

import subprocess

from cluster import package


def _tree(root, files):
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)


FILES = ["pipeline/a.py", "stages/x/b.py", "configs/demo.yaml", ".venv/lib/site.py", "runs/demo/run.json",
         "pipeline/__pycache__/a.cpython-311.pyc", ".env", "infra/mlflow/.env", "mlflow.db", ".git/HEAD",
         "seedline.egg-info/PKG-INFO", "data/big.jsonl", "keys/server.pem", "work/runs2/x.txt"]


def test_walked_tree_leaves_out_environments_runs_caches_and_secrets(tmp_path):
    _tree(tmp_path, FILES)
    got = {p.as_posix() for p in package.project_files(tmp_path, skip=[tmp_path.joinpath("work/runs2")
                                                                    .relative_to(tmp_path)])}
    assert got == {"pipeline/a.py", "stages/x/b.py", "configs/demo.yaml", "data/big.jsonl"}


def test_git_checkout_ships_what_git_knows_minus_ignored(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _tree(tmp_path, [f for f in FILES if not f.startswith(".git/")])
    (tmp_path / ".gitignore").write_text("data/\n")
    got = {p.as_posix() for p in package.project_files(tmp_path)}
    assert got == {".gitignore", "pipeline/a.py", "stages/x/b.py", "configs/demo.yaml", "work/runs2/x.txt"}


def test_working_dir_holds_the_project_and_the_job_config(tmp_path):
    _tree(tmp_path / "proj", ["pipeline/a.py", ".venv/x.py"])
    extra = {".seedline-job/demo.yaml": "name: demo\n"}
    wd = package.build_working_dir(tmp_path / "wd", tmp_path / "proj", extra)
    assert sorted(p.relative_to(wd).as_posix() for p in wd.rglob("*") if p.is_file()) == [
        ".seedline-job/demo.yaml", "pipeline/a.py"]
    assert package.project_root() is not None and (package.project_root() / "cluster").is_dir()
