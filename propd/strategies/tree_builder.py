"""Best token trees from per-head, per-rank acceptance probabilities.

With ``p[d][r]`` the probability that head d's rank-r guess is the right token (given the path so far was right), a
node reached by ranks (r_1..r_d) is accepted with probability prod_j p[j-1][r_j] (the heads are treated as
independent, as in Medusa's tree search, Cai et al. 2023, sec. 3.3.1, and ProPD's l(i), Zhong et al. 2024, sec. 4.2).
The expected number of accepted tokens of a tree is the sum of its nodes' values; since a child's value never
exceeds its parent's, taking nodes greedily by value (a best-first search) yields, for every size, a connected tree
of maximal expected acceptance, and all sizes come out of one search.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def best_tree(p: Sequence[Sequence[float]], size: int) -> tuple[list[tuple[int, ...]], list[float]]:
    """The ``size - 1`` most valuable paths (the root is free) and their values, in the order they were chosen."""
    depth, ranks = len(p), len(p[0]) if p else 0
    paths, values = [], []
    heap = [(-p[0][r], (r,)) for r in range(ranks)] if depth else []
    heapq.heapify(heap)
    while heap and len(paths) < size - 1:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        values.append(-neg)
        if len(path) < depth:
            for r in range(ranks):
                heapq.heappush(heap, (neg * p[len(path)][r], path + (r,)))
    return paths, values


def rank_probabilities(topk_curve: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per-rank probabilities from cumulative top-k accuracies (``curve[d][k]`` = P(right token in top k+1))."""
    out = []
    for curve in topk_curve:
        prev, row = 0.0, []
        for c in curve:
            row.append(max(c - prev, 0.0))
            prev = max(prev, c)
        out.append(row)
    return out
