"""Connected components of the duplicate graph; every node is labelled with its component's smallest uid.

Two implementations that give identical labels:

``components_local``
    In process, vectorised hook-and-shortcut: each edge hooks the larger of its two roots under the
    smaller, then pointer jumping flattens the trees; repeat until every edge is inside one tree.

``components_ray``
    Distributed on Ray tasks with the alternating *large-star* / *small-star* rounds of Kiveris et al.
    ("Connected Components in MapReduce and Beyond", 2014): O(log^2 n) rounds, each a shuffle of the
    edge list by node hash, so no single task ever holds more than its partition. It stops when the
    edges form a forest of stars whose centres are smaller than their leaves: then each star is a
    component and its centre the component's minimum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.dedupe.buckets import fmix64


def components_local(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes sorted, label of each node = smallest node of its component)."""
    if len(src) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
    s, d = inv[: len(src)], inv[len(src):]
    parent = np.arange(len(nodes))
    while True:
        ps, pd = parent[s], parent[d]
        if np.array_equal(ps, pd):
            break
        np.minimum.at(parent, np.maximum(ps, pd), np.minimum(ps, pd))
        while True:  # pointer jumping
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return nodes, nodes[parent]


# ---------------------------------------------------------------------------------------------------
# Distributed large-star / small-star.


def _partition_of(nodes: np.ndarray, num_partitions: int) -> np.ndarray:
    return (fmix64(nodes.astype(np.uint64)) % np.uint64(num_partitions)).astype(np.int64)


def _route(a: np.ndarray, b: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Split directed edges (a -> b) by the partition of ``a``; each piece is an (k, 2) array."""
    part = _partition_of(a, num_partitions)
    order = np.argsort(part, kind="stable")
    edges = np.stack([a[order], b[order]], axis=1)
    bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
    return [edges[bounds[i] : bounds[i + 1]] for i in range(num_partitions)]


def _routes_for(kind: str, a: np.ndarray, b: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Route undirected edges for the next step: large-star groups by both ends, small-star by the
    larger end (with its smaller neighbour)."""
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    keep = hi != lo
    hi, lo = hi[keep], lo[keep]
    if kind == "large":
        return _route(np.concatenate([hi, lo]), np.concatenate([lo, hi]), num_partitions)
    return _route(hi, lo, num_partitions)


def _grouped(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique directed edges sorted by (u, v); per-edge group min of v, and group starts."""
    edges = np.unique(edges, axis=0) if len(edges) else edges.reshape(0, 2)
    u, v = edges[:, 0], edges[:, 1]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.empty(0, np.int64)
    gmin = np.minimum.reduceat(v, starts) if len(u) else np.empty(0, np.int64)
    counts = np.diff(np.r_[starts, len(u)])
    return u, v, np.repeat(gmin, counts), starts


def _large_star(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For each node u with neighbours N(u): link every neighbour v > u to m = min(N(u) + {u}).

    Also counts nodes that break the star-forest condition (a node with a smaller neighbour that also
    has another neighbour)."""
    u, v, vmin, starts = _grouped(edges)
    m = np.minimum(vmin, u)
    sel = v > u
    counts = np.diff(np.r_[starts, len(u)])
    smaller = np.add.reduceat((v < u).astype(np.int64), starts) if len(u) else np.zeros(0, np.int64)
    bad = int(np.count_nonzero((smaller > 0) & (counts > 1)))
    return v[sel], m[sel], bad


def _small_star(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges arrive as (u, v) with v < u. Link u and every such v to m = min(v)."""
    u, v, vmin, starts = _grouped(edges)
    a = np.concatenate([v, u[starts]])
    b = np.concatenate([vmin, vmin[starts]])
    return a, b


def _star_step(kind: str, next_kind: str, num_partitions: int, *pieces: np.ndarray) -> tuple[Any, ...]:
    edges = np.concatenate(pieces) if pieces else np.empty((0, 2), np.int64)
    if kind == "large":
        a, b, bad = _large_star(edges)
    else:
        (a, b), bad = _small_star(edges), 0
    return (*_routes_for(next_kind, a, b, num_partitions), bad)


def _labels_of(*pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On a star forest routed for large-star: each node's label is its smallest neighbour or itself."""
    u, v, vmin, starts = _grouped(np.concatenate(pieces) if pieces else np.empty((0, 2), np.int64))
    return u[starts], np.minimum(u[starts], vmin[starts])


def components_ray(src: np.ndarray, dst: np.ndarray, num_partitions: int,
                   max_rounds: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Same result as ``components_local``, computed by Ray tasks over ``num_partitions`` partitions."""
    import ray

    if len(src) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    step = ray.remote(_star_step)
    labels_task = ray.remote(num_returns=2)(_labels_of)
    P = num_partitions
    # current[q]: the pieces of partition q (grouped by node, routed for large-star)
    current = [[ray.put(p)] for p in _routes_for("large", src, dst, P)]
    for _ in range(max_rounds):
        large = [step.options(num_returns=P + 1).remote("large", "small", P, *current[q]) for q in range(P)]
        if sum(ray.get([r[P] for r in large])) == 0:
            break
        # Shuffle: partition q of the next step gathers piece q of every task's output.
        small = [step.options(num_returns=P + 1).remote("small", "large", P, *[r[q] for r in large])
                 for q in range(P)]
        current = [[r[q] for r in small] for q in range(P)]
    else:
        raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
    outs = [labels_task.remote(*current[q]) for q in range(P)]
    parts = ray.get([o for pair in outs for o in pair])
    nodes = np.concatenate(parts[0::2])
    labels = np.concatenate(parts[1::2])
    order = np.argsort(nodes, kind="stable")
    return nodes[order], labels[order]


def connected_components(src: np.ndarray, dst: np.ndarray, mode: str, local_max_edges: int,
                         num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch: ``local``, ``ray``, or ``auto`` (in process while the edges fit ``local_max_edges``)."""
    if mode == "local" or (mode == "auto" and len(src) <= local_max_edges):
        return components_local(src, dst)
    return components_ray(src, dst, num_partitions)
