"""Resuming a ZeRO checkpoint on another number of workers (a lost node, an elastic resize, a user's choice).

ZeRO-1/2/3 checkpoints hold each rank's slice of the fp32 master weights and Adam moments, cut for the
world size that wrote them. ``universal`` converts such a checkpoint with DeepSpeed's own tool
(``deepspeed.checkpoint.ds_to_universal``) into its world-size-free "universal" layout: one file per
parameter and state (``fp32``, ``exp_avg``, ``exp_avg_sq``), which every rank of the new world slices its
own partition from (``engine.load_checkpoint`` with ``load_universal_checkpoint`` on). ZeRO-0 needs none
of this: its files hold whole tensors.

The conversion runs once per node, under a node lock, into the node-local cache, and is reused by every
rank of that node (and by a later rollback to the same checkpoint). DeepSpeed's converter reads the
``.pt`` files with ``weights_only=False``; here every ``torch.load`` it makes goes through
``safe_torch_load``, so a planted pickle is refused exactly as on a same-size resume.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stages.lm.node_cache import cache_root, key_of, node_lock
from stages.lm.safe_load import safe_torch_load

DONE = ".converted"


@contextlib.contextmanager
def safe_torch_loads() -> Iterator[None]:
    """Within the block, ``torch.load`` (any caller) reads through ``safe_torch_load``."""
    import torch

    original = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        return safe_torch_load(f, kwargs.get("map_location", map_location), load=original)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def own_group_settings(engine: Any) -> Iterator[None]:
    """Keep each optimizer param group's own settings across a universal load: DeepSpeed's ZeRO-3 loader
    gives every group the first group's (so the norms, which have no weight decay, would get some)."""
    groups = engine.optimizer.optimizer.param_groups
    kept = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    yield
    for group, settings in zip(engine.optimizer.optimizer.param_groups, kept, strict=True):
        group.update(settings)


def universal_root(out_url: str) -> Path:
    """This node's directory of converted checkpoints for the stage at ``out_url``."""
    return cache_root() / "universal" / key_of(out_url)


def universal(ckpt_root: Path, tag: str, out_url: str) -> Path:
    """``<ckpt_root>/<tag>`` (written by any number of ZeRO-1/2/3 ranks) as a universal checkpoint; returns
    the root that holds ``<tag>/`` in universal form (node-local, converted at most once per node)."""
    dest_root = universal_root(out_url)
    dest = dest_root / tag
    with node_lock(f"universal-{key_of(out_url)}"):
        if not (dest / DONE).is_file():
            shutil.rmtree(dest_root, ignore_errors=True)  # an older tag's conversion, or a killed one
            dest.mkdir(parents=True)
            _convert(ckpt_root / tag, dest)
            (dest / DONE).write_text(tag)
    return dest_root


def _convert(src: Path, dest: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = SimpleNamespace(input_folder=str(src), output_folder=str(dest), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)
    chatter = io.StringIO()  # its print lines and progress bars; shown only if it fails
    try:
        with safe_torch_loads(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:
        sys.stderr.write(chatter.getvalue()[-4000:])
        raise RuntimeError(f"{src}: converting the ZeRO checkpoint for another worker count failed: "
                           f"{e}") from e


def release(out_url: str, local_rank: int) -> None:
    """Drop this node's converted copy (local rank 0, after every rank loaded it)."""
    if local_rank == 0:
        with node_lock(f"universal-{key_of(out_url)}"):
            shutil.rmtree(universal_root(out_url), ignore_errors=True)
