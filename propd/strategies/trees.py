"""Named tree shapes for the static sizer.

``mc_sim_7b_63``: the 63-node tree Medusa ships as its default for Vicuna-7B (Cai et al. 2023; Medusa repository,
``medusa/model/medusa_choices.py``), found there by simulating acceptance with measured per-head accuracies. Depth 4,
top-10 guesses per head.
"""

from __future__ import annotations

from propd.errors import PropdError
from propd.tree import chain_paths

MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,),
    (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1),
    (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0),
    (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

NAMED_TREES = {"mc_sim_7b_63": MC_SIM_7B_63}


def tree_paths(spec: str | list | tuple) -> tuple[tuple[int, ...], ...]:
    """Paths for a tree spec: a name in NAMED_TREES, ``chain:N`` (N top-1 guesses), or an explicit path list."""
    if isinstance(spec, (list, tuple)):
        return tuple(tuple(int(r) for r in p) for p in spec)
    if spec in NAMED_TREES:
        return NAMED_TREES[spec]
    if isinstance(spec, str) and spec.startswith("chain:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = -1
        if n < 0:
            raise PropdError(f"bad chain tree {spec!r}: use chain:N with N >= 0")
        return chain_paths(n)
    raise PropdError(f"unknown tree {spec!r} (known: {', '.join(NAMED_TREES)}, chain:N, or a list of paths)")
