"""TreeSizer ``static``: the same tree every step (Medusa's fixed trees, BPD's chains, or a single node for AR)."""

from __future__ import annotations

import attrs

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.tree import DraftTree, normalize_paths, tree_paths


@attrs.frozen
class StaticConfig:
    """``tree``: a named shape, ``chain:N``, ``chain`` (as deep as the loaded heads), or a list of paths.

    ``max_rows`` (0: no cap): the most token rows a step verifies in all, batch rows x nodes. With B rows each row's
    tree is cut to max(1, max_rows // B) nodes: a ``budget:N:D`` tree to ``budget:K:min(D, K - 1)``, any other to
    its first K - 1 paths in breadth-first order (each path's parent comes before it, so the cut is a tree). A
    budget sized for one row then stays affordable in a batch, where each row's extra nodes cost about as much as more
    rows."""

    tree: str | tuple = attrs.field(default="mc_sim_7b_63")
    max_rows: int = attrs.field(default=0, validator=attrs.validators.ge(0))


class StaticSizer:
    def __init__(self, config: StaticConfig):
        self.spec = config.tree
        self.max_rows = config.max_rows
        self.paths = None if self.spec == "chain" else tree_paths(self.spec)
        if self.paths is not None:
            DraftTree.from_paths(self.paths)  # validate early
        self._trees: dict[tuple[int, str], DraftTree] = {}  # by (nodes per row, device)

    @hookimpl
    def propd_setup(self, model):
        if self.paths is None:
            if model.heads is None:
                raise PropdError("tree 'chain' is as deep as the Medusa heads, but none are loaded: pass --heads DIR")
            self.paths = tree_paths(f"chain:{model.heads.num_heads}")

    def _paths(self, k: int) -> tuple[tuple[int, ...], ...]:
        """The tree cut to at most ``k`` nodes (root included)."""
        if k > len(self.paths):
            return self.paths
        if isinstance(self.spec, str) and self.spec.startswith("budget:"):
            depth = max((len(p) for p in self.paths), default=0)
            return tree_paths(f"budget:{k}:{min(depth, k - 1)}")
        return normalize_paths(self.paths)[:k - 1]

    @hookimpl
    def propd_tree(self, ctx):
        # built once per size, cached on the device; keyed by the device asked for, since a tensor on
        # torch.device("cuda") reports "cuda:0", and comparing the two would rebuild the tree (host work and copies)
        # every step
        k = len(self.paths) + 1
        if self.max_rows:
            k = min(k, max(1, self.max_rows // ctx.batch_size))
        key = (k, str(ctx.device))
        tree = self._trees.get(key)
        if tree is None:
            tree = self._trees[key] = DraftTree.from_paths(self._paths(k), device=ctx.device)
        return tree


@hookimpl
def propd_register_components(register):
    register("sizer", "static", StaticSizer, StaticConfig,
             "a fixed tree: a named shape (mc_sim_7b_63), chain:N, budget:N:D, or a path list; chain:0 is plain AR; "
             "max_rows=R cuts it to R // batch nodes per row")
