"""From connected components to removal decisions.

In each component the first document by stable order (smallest uid) is kept and the others removed.
A component larger than ``max_cluster_size`` is not trusted whole (transitive closure over templated
text can chain unrelated documents together): its members are re-verified against the kept document;
those that fail are checked against the next unassigned member, which becomes a kept document of its
own, and so on. Every removed document then resembles the document kept in its place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.dedupe.layout import Layout, uid_row, uid_shard
from stages.dedupe.sigstore import Verifier
from stages.dedupe.tables import read_arrow


@dataclass
class Removal:
    """Removed documents sorted by uid, with their component root and kept document (uids)."""

    uid: np.ndarray
    root: np.ndarray
    kept: np.ndarray
    exact: np.ndarray  # bool: an exact repeat of an earlier document's normalised text
    largest_component: int
    largest_cluster: int
    oversize_components: int


def _anchor_split(members: np.ndarray, verifier: Verifier) -> np.ndarray:
    """Kept document of each member of one oversize component (members sorted by uid)."""
    kept = np.empty_like(members)
    remaining = members
    while len(remaining):
        anchor, rest = remaining[0], remaining[1:]
        ok = verifier.similar(np.full(len(rest), anchor), rest)
        kept[np.searchsorted(members, anchor)] = anchor
        kept[np.searchsorted(members, rest[ok])] = anchor
        remaining = rest[~ok]
    return kept


def resolve(nodes: np.ndarray, labels: np.ndarray, exact_dups: np.ndarray, verifier: Verifier | None,
            max_cluster_size: int) -> Removal:
    """Decide what each clustered document becomes. ``verifier`` None skips re-verification (exact-only
    clusters hold identical texts)."""
    order = np.lexsort((nodes, labels))
    n, lab = nodes[order], labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(n) else np.empty(0, np.int64)
    sizes = np.diff(np.r_[starts, len(n)])
    kept = lab.copy()
    oversize = np.flatnonzero(sizes > max_cluster_size) if verifier is not None else np.empty(0, np.int64)
    for g in oversize:
        s, e = starts[g], starts[g] + sizes[g]
        kept[s:e] = _anchor_split(n[s:e], verifier)
    removed = n != kept
    _, cluster_sizes = np.unique(kept, return_counts=True) if len(kept) else (None, np.zeros(1, np.int64))
    by_uid = np.argsort(n[removed], kind="stable")
    uid = n[removed][by_uid]
    return Removal(
        uid=uid, root=lab[removed][by_uid], kept=kept[removed][by_uid],
        exact=np.isin(uid, exact_dups), largest_component=int(sizes.max()) if len(sizes) else 1,
        largest_cluster=int(cluster_sizes.max()) if len(n) else 1, oversize_components=len(oversize),
    )


def lookup_ids(out: str, uids: np.ndarray) -> np.ndarray:
    """Document ids (strings) of ``uids``, read from the shards' ``id`` columns."""
    lay = Layout(out)
    res = np.empty(len(uids), dtype=object)
    shards, rows = uid_shard(uids), uid_row(uids)
    for shard in np.unique(shards):
        sel = np.flatnonzero(shards == shard)
        ids = read_arrow(lay.ids(int(shard))).column("id")
        res[sel] = ids.take(pa.array(rows[sel])).to_pylist()
    return res


def removal_table(out: str, rm: Removal) -> pa.Table:
    """``uid``, ``cluster_id`` (id of the component's first document), ``kept_id``, ``kind``, ``kept_uid``."""
    need = np.unique(np.concatenate([rm.root, rm.kept]))
    ids = lookup_ids(out, need)
    root_ids = ids[np.searchsorted(need, rm.root)] if len(need) else np.empty(0, object)
    kept_ids = ids[np.searchsorted(need, rm.kept)] if len(need) else np.empty(0, object)
    kind = pc.if_else(pa.array(rm.exact, pa.bool_()), "exact", "near") if len(rm.uid) \
        else pa.array([], pa.string())
    return pa.table({
        "uid": pa.array(rm.uid, pa.int64()), "cluster_id": pa.array(list(root_ids), pa.string()),
        "kept_id": pa.array(list(kept_ids), pa.string()), "kind": kind.cast(pa.string()),
        "kept_uid": pa.array(rm.kept, pa.int64()),
    })
