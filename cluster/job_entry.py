"""The entrypoint of a submitted job: run ``seedline`` from a private copy of the job's working directory.

Why: Ray unpacks a job's ``working_dir`` into ``<temp dir>/session_*/runtime_resources/working_dir_files/``
and starts the driver there. Every node's runtime-env agent that later sets up the same environment for
a task or actor *replaces* that directory (Ray's working_dir plugin unpacks with ``overwrite=True``:
``rmtree`` then unzip). On separate machines each node has its own copy, but when several Ray nodes share
one temp dir (``ray start`` nodes on one machine with the default ``/tmp/ray``, or a temp dir on shared
storage) the first task on another node deletes the directory the driver runs in. The driver's current
directory is then a deleted inode: ``getcwd()`` fails, and the first torch import (as pretrain begins)
dies in oneMKL's loader (``Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so``, then
``std::bad_alloc`` in ``dlopen`` and a segfault); a module imported during the unzip window is missing.

So the driver never runs from Ray's cache: this copies the working directory once, before the driver
connects to Ray (no task exists yet, so nothing can be replacing it), and runs ``seedline`` in the copy
with ``PYTHONPATH`` pointing there. Ray's workers keep using the job's ``working_dir`` as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def snapshot(src: Path) -> Path:
    """A private copy of ``src`` in a new temporary directory."""
    dst = Path(tempfile.mkdtemp(prefix="seedline-driver-")) / "wd"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _env_for(src: Path, dst: Path) -> dict[str, str]:
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    parts = [str(dst) if Path(p).resolve() == src.resolve() else p for p in parts]
    if str(dst) not in parts:
        parts.insert(0, str(dst))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PWD"] = str(dst)
    return env


def main(argv: list[str]) -> int:
    """``python -m cluster.job_entry CMD ARGS...`` runs ``CMD ARGS...`` (``seedline run CONFIG``) in a
    snapshot of the current directory; its exit status."""
    if not argv:
        print("usage: python -m cluster.job_entry CMD [ARGS...]", file=sys.stderr)
        return 2
    src = Path.cwd()
    dst = snapshot(src)
    proc = subprocess.Popen(argv, cwd=dst, env=_env_for(src, dst))
    # `ray job stop` signals the entrypoint's process group; pass what reaches us on to the driver too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    try:
        return proc.wait()
    finally:
        shutil.rmtree(dst.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
