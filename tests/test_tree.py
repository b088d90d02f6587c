import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from propd import DraftTree, PropdError
from propd.tree import MC_SIM_7B_63, tree_paths as named_tree
from propd.tree import survivors
from strategies_ht import tree_paths


def ancestors(paths, i):
    allp = [()] + list(paths)
    p = allp[i]
    return {allp.index(p[:k]) for k in range(len(p) + 1)}


@given(tree_paths())
def test_mask_is_ancestor_closure(paths):
    tree = DraftTree.from_paths(paths)
    assert tree.num_nodes == len(paths) + 1
    for i in range(tree.num_nodes):
        want = ancestors(tree.paths, i)
        assert set(torch.nonzero(tree.mask[i]).flatten().tolist()) == want
        assert tree.depths[i] == len(want) - 1
        # paths_to lists root .. node, then repeats the node
        chain = tree.paths_to[i].tolist()
        assert chain[: len(want)] == sorted(want) and set(chain[len(want):]) <= {i}
        if i:
            assert tree.parents[i] < i  # topological order


@given(tree_paths(), st.integers(0, 2**31 - 1))
def test_keep_closure_never_keeps_a_node_without_its_parent(paths, seed):
    tree = DraftTree.from_paths(paths)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(3, tree.num_nodes, generator=g) < 0.6
    closed = tree.keep_closure(keep)
    assert closed[:, 0].all()
    for b in range(3):
        for i in range(1, tree.num_nodes):
            expect = all(keep[b, a] for a in ancestors(tree.paths, i) if a != 0)
            assert bool(closed[b, i]) == expect
    idx, valid = survivors(closed, pad_index=tree.num_nodes)
    for b in range(3):
        kept = idx[b][valid[b]].tolist()
        assert kept == sorted(torch.nonzero(closed[b]).flatten().tolist())
        assert (idx[b][~valid[b]] == tree.num_nodes).all()


def test_named_trees():
    tree = DraftTree.from_paths(named_tree("mc_sim_7b_63"))
    assert tree.num_nodes == 64 and tree.max_depth == 4 and tree.max_rank == 9
    assert len(MC_SIM_7B_63) == 63
    chain = DraftTree.from_paths(named_tree("chain:3"))
    assert chain.num_nodes == 4 and chain.parents.tolist() == [-1, 0, 1, 2]
    assert DraftTree.chain(0).num_nodes == 1


@pytest.mark.parametrize("bad", [[(0, 1)], [(-1,)]])
def test_bad_paths_are_refused(bad):
    with pytest.raises(PropdError):
        DraftTree.from_paths(bad)


@pytest.mark.parametrize("spec", ["nope", "chain:x", "chain:-2"])
def test_bad_tree_names_are_refused(spec):
    with pytest.raises(PropdError):
        named_tree(spec)


def test_budget_trees_have_their_size_and_depth():
    from propd.tree import DraftTree, tree_paths

    for n, d in [(1, 0), (2, 1), (8, 3), (32, 6), (7, 6)]:
        t = DraftTree.from_paths(tree_paths(f"budget:{n}:{d}"))
        assert (t.num_nodes, t.max_depth) == (n, d)
    for bad in ["budget:8:0", "budget:8:8", "budget:0:0", "budget:x:2", "budget:4"]:
        with pytest.raises(PropdError, match="budget"):
            tree_paths(bad)


@given(rows=st.lists(st.lists(st.integers(0, 10**6), min_size=0, max_size=14), min_size=1, max_size=5),
       extra_depth=st.integers(-1, 3))
def test_row_trees_from_host_parents_equal_the_tensor_path(rows, extra_depth):
    """Small CPU trees are built by a walk, in the CPU extension where it is loaded and in Python; every tensor
    equals the repeated-squaring path's, also when the given depth is one below or above the deepest node's, and a
    node before its parent sends both walks to the tensor path."""
    from propd.models import cpu_kernel
    from propd.tree import RowTrees

    cpu_kernel.extension()  # loaded where it can be, so that the walk in the extension is compared too
    T = max(len(r) for r in rows) + 1
    parents = torch.tensor([[-1] + [c % (i + 1) for i, c in enumerate(r + [0] * (T - 1 - len(r)))] for r in rows])
    deepest = int(RowTrees.from_parents(parents).max_depth)
    D = max(0, deepest + extra_depth)
    big, native = RowTrees.HOST_CELLS, RowTrees.NATIVE
    try:
        walks = []
        for RowTrees.NATIVE in ([True, False] if cpu_kernel.loaded() is not None else [False]):
            walks.append(RowTrees.from_parents(parents, max_depth=D))
            if T > 1:
                bad = parents.clone()
                bad[-1, -1] = T - 1  # its own parent
                assert RowTrees._from_host_parents(bad, D) is None
        RowTrees.HOST_CELLS = 0  # the tensor path
        slow = RowTrees.from_parents(parents, max_depth=D)
    finally:
        RowTrees.HOST_CELLS, RowTrees.NATIVE = big, native
    for fast in walks:
        for name in ("parents", "depths", "mask", "paths_to"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert fast.max_depth == slow.max_depth == D
