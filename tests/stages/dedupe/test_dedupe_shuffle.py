"""The in-process bucket shuffle gives exactly the Ray Data shuffle's edges and the stage's outputs, on real
text (standard library sources with planted near-duplicates), and the size threshold picks between them."""

from __future__ import annotations

import json
import logging
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import Progress, StageContext
from pipeline.tracking import NullTracker
from stages.dedupe.buckets import shuffle_edges, shuffle_edges_local
from stages.dedupe.config import DedupeConfig
from stages.dedupe.layout import Layout
from stages.dedupe.run import run


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from pipeline.ray_init import init_ray

    init_ray(None, 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ctx(out: Path, address: str) -> StageContext:
    return StageContext(name="dedupe", out_dir=str(out), run_dir=str(out.parent), fingerprint="test",
                        inputs={}, tracker=NullTracker(), progress=Progress(None),
                        logger=logging.getLogger("test"), ray_address=address)


def _mutate(text: str, changes: int, rng: random.Random) -> str:
    words = text.split(" ")
    for p in rng.sample(range(len(words)), min(changes, len(words))):
        words[p] = words[p] + "_x"
    return " ".join(words)


SHARE_CHANGED = {1: 0.005, 2: 0.01, 3: 0.02, 4: 0.03, 5: 0.045}


def _corpus(root: Path) -> str:
    """~400 real Python sources, each 10th with an exact copy, and near copies at several distances."""
    rng = random.Random(3)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")[:20_000]
             for p in sorted(stdlib.rglob("*.py"))[::5][:400]]
    docs = [(f"src{i}", t) for i, t in enumerate(texts) if t.strip()]
    for i, (_, t) in enumerate(list(docs)):
        if i % 10 == 0:
            docs.append((f"exact{i}", t))
        elif i % 10 in SHARE_CHANGED:  # Jaccard from ~0.95 down to ~0.6: some candidates fail verification
            docs.append((f"near{i}", _mutate(t, 1 + int(len(t.split(" ")) * SHARE_CHANGED[i % 10]), rng)))
    rng.shuffle(docs)
    root.mkdir(parents=True)
    for f in range(4):
        with open(root / f"part-{f}.jsonl", "w") as fh:
            for doc_id, t in docs[f::4]:
                fh.write(json.dumps({"id": doc_id, "text": t}) + "\n")
    return str(root / "*.jsonl")


def _outputs(out: Path) -> dict[str, bytes]:
    keep = [p for p in out.rglob("*") if p.is_file() and (p.relative_to(out).parts[0] in ("data", "rejects")
                                                          or p.name in ("duplicates.parquet", "stats.json"))]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(keep)}


def test_shuffle_in_process_and_on_ray_give_identical_edges_and_outputs(ray_address, tmp_path):
    glob = _corpus(tmp_path / "in")
    local = DedupeConfig(input=glob, id_field="id", shuffle="local")
    stats = run(local, _ctx(tmp_path / "local", ray_address))
    assert stats["near_duplicates"] > 20 and stats["exact_duplicates"] > 20
    # The size threshold: 0 rows sends 'auto' to Ray Data; other partitions and Ray components too.
    on_ray = local.model_copy(update={"shuffle": "auto", "local_shuffle_max_rows": 0, "num_partitions": 3,
                                      "components": "ray"})
    assert not on_ray.shuffle_in_process(1) and local.shuffle_in_process(10**12)
    assert DedupeConfig(input=glob).shuffle_in_process(10_000)
    run(on_ray, _ctx(tmp_path / "ray", ray_address))
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")

    # The edges themselves (near candidates verified or rejected, exact edges), from the same map output.
    lay = Layout(str(tmp_path / "local"))
    files = [lay.bands(i) for i in range(4)]
    bands, _ = local.lsh_params()
    for parts in (2, 7):
        a = shuffle_edges_local(files, lay.out, bands, local.verifier_args(), parts)
        b = shuffle_edges(files, lay.out, bands, local.verifier_args(), parts)
        assert len(a["src"]) > 50 and set(a) == set(b)
        assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), parts
        assert set(np.unique(a["flag"]).tolist()) == {0, 1, 2}  # rejected, near and exact edges all seen
