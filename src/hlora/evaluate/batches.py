"""Which rows share a forward pass: length-sorted runs cut to minimise padding plus a cost per pass.

A context pass of the shared-context path holds `batch_size` contexts, or more while it stays within
batch_size * TOKENS_PER_CONTEXT padded tokens; its continuations run in passes of at most that many
padded tokens. Passes are cut to minimise padded tokens + FORWARD_COST per pass: on CPU a pass costs
about as much as 50 tokens whatever its size (every weight is read from memory once per pass), so
short questions need few, full passes. (The engine reads both constants from this module.)
"""
from __future__ import annotations

import math

TOKENS_PER_CONTEXT = 128
FORWARD_COST = 48


def _length_batches(keys: list, batch_size: int, slack: float = 0.2, min_slack: int = 16, size=len):
    """Consecutive runs of length-sorted (descending, by `size`) keys, at most `batch_size` each; a run
    also ends where padding to its first (longest) key would waste more than `slack` of it
    (and more than `min_slack` tokens): on CPU padded tokens cost as much as real ones."""
    batch: list = []
    for k in keys:
        if batch and (
            len(batch) >= max(1, batch_size)
            or size(batch[0]) - size(k) > max(slack * size(batch[0]), min_slack)
        ):
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


def _packed_batches(items: list, size, min_count: int, max_tokens: int) -> list[list]:
    """Split length-sorted (descending, by `size`) items into consecutive batches that minimise the
    padded tokens plus FORWARD_COST per batch (dynamic programming). A batch holds up to
    `min_count` items, or more while its padded size stays within `max_tokens`."""
    lens = [size(x) for x in items]
    n = len(items)
    best = [0] + [math.inf] * n  # best[j]: cost of the first j items
    start = [0] * (n + 1)
    for i in range(n):
        most = max(min_count, max_tokens // max(lens[i], 1), 1)
        for j in range(i + 1, min(n, i + most) + 1):
            cost = best[i] + FORWARD_COST + (j - i) * lens[i]
            if cost < best[j]:
                best[j], start[j] = cost, i
    cuts, j = [], n
    while j > 0:
        cuts.append((start[j], j))
        j = start[j]
    return [items[a:b] for a, b in reversed(cuts)]
