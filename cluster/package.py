"""The working directory a job runs in: the project's source plus the job's config file.

It is assembled in a temporary directory so the job sees exactly what was submitted, even if files
change during the upload, and so the config (which may live outside the project) travels with it. A
git checkout contributes what git knows about (tracked and untracked, not ignored); otherwise the tree
is walked. Virtual environments, run directories and caches are always left out.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

from cluster.errors import ClusterError

JOB_DIR = ".seedline-job"  # inside the working directory: the job's config
EXCLUDE = (
    ".git", ".venv", "venv", ".env", ".env.*", "*.pem", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", ".mypy_cache", "*.egg-info", ".ipynb_checkpoints", "node_modules", "build", "dist", "runs",
    "mlruns", "mlflow.db", "*.db-journal", JOB_DIR, ".whl", ".gl", ".seedline-cluster",
)
MAX_BYTES = 256 * 1024 * 1024  # Ray refuses packages over 512 MiB; a project is far smaller


def project_root() -> Path | None:
    """The Seedline checkout this code runs from, or None when it is an installed package (then the
    cluster's image provides the code and only the config is shipped)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _excluded(rel: Path, skip: list[Path]) -> bool:
    if any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in EXCLUDE):
        return True
    return any(rel == s or s in rel.parents for s in skip)


def _git_files(root: Path) -> list[Path] | None:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, timeout=60, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [Path(p) for p in out.stdout.decode().split("\0") if p]


def _walk_files(root: Path) -> list[Path]:
    return [p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def project_files(root: Path, skip: list[Path] | None = None) -> list[Path]:
    """Relative paths of the project files to ship, sorted."""
    skip = skip or []
    files = _git_files(root)
    if files is None:
        files = _walk_files(root)
    keep = [f for f in files if not _excluded(f, skip) and (root / f).is_file()]
    return sorted(set(keep))


def build_working_dir(dest: Path, project: Path | None, extra: dict[str, str],
                      skip: list[Path] | None = None) -> Path:
    """Fill ``dest`` with the project's files and ``extra`` (relative path -> text); return it."""
    dest.mkdir(parents=True, exist_ok=True)
    total, sizes = 0, []
    if project is not None:
        for rel in project_files(project, skip):
            src, dst = project / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            size = dst.stat().st_size
            total += size
            sizes.append((size, rel))
    if total > MAX_BYTES:
        big = ", ".join(f"{r} ({s / 2**20:.0f} MiB)" for s, r in sorted(sizes, reverse=True)[:3])
        raise ClusterError(
            f"the project to upload is {total / 2**20:.0f} MiB (largest: {big}); keep data on shared "
            "storage and list large files in .gitignore", exit_code=2)
    for rel, text in extra.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return dest
