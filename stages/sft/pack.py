"""Best-fit-decreasing packing of examples into rows of at most ``capacity`` tokens.

Examples are taken longest first (ties: input order) and each goes into the open row whose free space
is the smallest that still fits it, or into a new row. The free-space lookup is a segment tree over the
possible free sizes (0..capacity) holding how many rows have each, so packing n examples costs
O(n log capacity) and the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence


class _FreeSpace:
    """Counts of rows per free size, answering "smallest free size >= need" in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # count[node]: rows whose free size lies in node's range
        self.rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # row ids per free size (a stack)

    def add(self, free: int, row: int) -> None:
        self.rows[free].append(row)
        self._bump(free, 1)

    def take(self, need: int) -> tuple[int, int] | None:
        """Remove and return (free size, row) of a row with the smallest free size >= ``need``."""
        free = self._first_at_least(need)
        if free is None:
            return None
        self._bump(free, -1)
        return free, self.rows[free].pop()

    def _bump(self, free: int, delta: int) -> None:
        i = free + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def _first_at_least(self, need: int) -> int | None:
        if need >= self.size:
            return None
        # Walk up from leaf `need`, find the nearest non-empty range to its right, then descend into it.
        i = need + self.size
        if self.count[i]:
            return need
        while i > 1:
            if i % 2 == 0 and self.count[i + 1]:
                i += 1
                break
            i //= 2
        else:
            return None
        while i < self.size:
            i = 2 * i if self.count[2 * i] else 2 * i + 1
        return i - self.size


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices; each row's lengths sum to at most ``capacity``.

    Rows are listed in the order they were opened, examples within a row in the order they were placed
    (longest first). Every length must be in 1..capacity.
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"example {i} has length {n}; need 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free = _FreeSpace(capacity)
    for i in order:
        n = lengths[i]
        hit = free.take(n)
        if hit is None:
            rows.append([i])
            left, row = capacity - n, len(rows) - 1
        else:
            left, row = hit[0] - n, hit[1]
            rows[row].append(i)
        if left > 0:
            free.add(left, row)
    return rows
