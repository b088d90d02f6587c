"""Hypothesis strategies shared by the tests."""

from hypothesis import strategies as st


@st.composite
def tree_paths(draw, max_nodes: int = 24, max_depth: int = 4, max_rank: int = 3):
    """A random valid Medusa-style path list (every prefix present)."""
    n = draw(st.integers(0, max_nodes))
    paths: set[tuple[int, ...]] = set()
    for _ in range(n):
        if paths and draw(st.booleans()):
            parent = draw(st.sampled_from(sorted(paths)))
            if len(parent) >= max_depth:
                continue
        else:
            parent = ()
        paths.add(parent + (draw(st.integers(0, max_rank)),))
    # add the missing prefixes of (parent + rank) when a rank was drawn under an existing parent
    closed = set()
    for p in paths:
        for k in range(1, len(p) + 1):
            closed.add(p[:k])
    return sorted(closed)
