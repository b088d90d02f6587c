"""TreeSizer ``static``: the same tree every step (Medusa's fixed trees, BPD's chains, or a single node for AR)."""

from __future__ import annotations

import attrs

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.tree import tree_paths
from propd.tree import DraftTree


@attrs.frozen
class StaticConfig:
    """``tree``: a named shape, ``chain:N``, ``chain`` (as deep as the loaded heads), or a list of paths."""

    tree: str | tuple = attrs.field(default="mc_sim_7b_63")


class StaticSizer:
    def __init__(self, config: StaticConfig):
        self.spec = config.tree
        self.paths = None if self.spec == "chain" else tree_paths(self.spec)
        if self.paths is not None:
            DraftTree.from_paths(self.paths)  # validate early
        self._tree: DraftTree | None = None
        self._tree_device: str | None = None

    @hookimpl
    def propd_setup(self, model):
        if self.paths is None:
            if model.heads is None:
                raise PropdError("tree 'chain' is as deep as the Medusa heads, but none are loaded: pass --heads DIR")
            self.paths = tree_paths(f"chain:{model.heads.num_heads}")

    @hookimpl
    def propd_tree(self, ctx):
        # built once, cached on the device; keyed by the device asked for, since a tensor on torch.device("cuda")
        # reports "cuda:0", and comparing the two would rebuild the tree (host work and copies) every step
        if self._tree is None or self._tree_device != str(ctx.device):
            self._tree = DraftTree.from_paths(self.paths, device=ctx.device)
            self._tree_device = str(ctx.device)
        return self._tree


@hookimpl
def propd_register_components(register):
    register("sizer", "static", StaticSizer, StaticConfig,
             "a fixed tree: a named shape (mc_sim_7b_63), chain:N, or a path list; chain:0 is plain AR")
