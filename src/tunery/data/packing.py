"""Sample packing: documents into rows of at most sequence_len tokens, best-fit decreasing.

Best-fit decreasing places each document (longest first) into the open row with the least room that
still fits it, which packs at least as tightly as first-fit decreasing. Free room is bucketed by size,
so each placement is a bisection over the distinct free sizes, not a scan over the rows.
"""

from __future__ import annotations

import bisect
from typing import Any


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the documents in each row; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free room values that have open rows
    by_free: dict[int, list[int]] = {}
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document of {n} tokens is longer than the row ({capacity})")
        j = bisect.bisect_left(free_sizes, n)
        if j < len(free_sizes):
            room = free_sizes[j]
            stack = by_free[room]
            b = stack.pop()
            if not stack:
                del by_free[room]
                free_sizes.pop(j)
        else:
            room = capacity
            b = len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left in by_free:
                by_free[left].append(b)
            else:
                by_free[left] = [b]
                bisect.insort(free_sizes, left)
    return bins


def pack_rows(docs: list[dict[str, Any]], capacity: int) -> list[dict[str, Any]]:
    """Concatenate documents into packed rows; position_ids restart at 0 at each document."""
    bins = pack_bins([len(d["input_ids"]) for d in docs], capacity)
    positions = list(range(capacity))  # sliced, so no int objects are made per token
    rows = []
    for b in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in b:
            d = docs[i]
            ids += d["input_ids"]
            labels += d["labels"]
            pos += positions[: len(d["input_ids"])]
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def single_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    longest = max((len(d["input_ids"]) for d in docs), default=0)
    positions = list(range(longest))
    for d in docs:
        d["position_ids"] = positions[: len(d["input_ids"])]
    return docs


def doc_lengths(position_ids: list[int]) -> list[int]:
    """Document lengths of a packed row, from where its positions restart at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    return [b - a for a, b in zip(starts, starts[1:] + [len(position_ids)])]
