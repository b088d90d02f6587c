"""Test-only propd components, shipped as a third-party plugin package (entry-point group ``propd``).

* proposer ``oracle``: knows each prompt's true greedy continuation and puts it on one random branch of the tree,
  fills every other node with random tokens, and corrupts any node with probability ``corrupt``; accepted lengths
  then range from 0 to the tree depth. With ``per_row`` every row gets a random tree of its own (``RowTrees``),
  of a random size within the sizer's budget, padded with absent nodes. Used to prove the engine lossless.
* pruner ``random``: after ``layer`` layers keeps each node with probability ``keep``; the engine must still be
  lossless, since pruning may only shorten the accepted path.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

import propd
from propd.tree import RowTrees
from propd.types import Draft


@attrs.frozen
class OracleConfig:
    continuations: dict = attrs.field(factory=dict)  # prompt index -> greedy continuation token ids
    corrupt: float = 0.2
    seed: int = 0
    per_row: bool = False


class OracleProposer:
    def __init__(self, config: OracleConfig):
        self.cfg = config
        self.rng = np.random.default_rng(config.seed)

    def _fill(self, cont: list[int], start: int, parents: list[int], right: list[int], out: np.ndarray) -> None:
        """Put the continuation on the nodes of ``right`` (a root-to-leaf chain), corrupting some."""
        for d, node in enumerate(right[1:], start=1):
            if start + d < len(cont) and self.rng.random() >= self.cfg.corrupt:
                out[node] = cont[start + d]

    @propd.hookimpl
    def propd_propose(self, ctx, tree):
        B, T, V = ctx.batch_size, tree.num_nodes, ctx.vocab_size
        out = self.rng.integers(0, V, size=(B, T))
        if not self.cfg.per_row:
            parent_list = tree.parents.tolist()
            ranks = [()] + list(tree.paths)
        else:
            parents = np.zeros((B, T), dtype=np.int64)
            parents[:, 0] = -1
            present = np.ones((B, T), dtype=bool)
        for b, row in enumerate(ctx.row_ids):
            cont = self.cfg.continuations.get(row, [])
            start = ctx.num_generated[b] - 1  # continuation index of the root
            if self.cfg.per_row:
                n = int(self.rng.integers(1, T + 1))  # this row's real nodes
                for i in range(1, T):
                    parents[b, i] = self.rng.integers(0, i) if i < n else 0
                present[b, n:] = False
                par = parents[b, :n].tolist()
            else:
                par = parent_list
            children: dict[int, list[int]] = {}
            for i, p in enumerate(par[1:], start=1):
                children.setdefault(p, []).append(i)
            right, node = [0], 0
            while node in children:  # a random root-to-leaf branch carries the continuation
                node = children[node][int(self.rng.integers(len(children[node])))]
                right.append(node)
            self._fill(cont, start, par, right, out[b])
        tokens = torch.as_tensor(out, dtype=torch.long, device=ctx.device)
        tokens[:, 0] = ctx.roots
        if not self.cfg.per_row:
            return Draft(tokens=tokens, tree=tree)
        rows = RowTrees.from_parents(torch.as_tensor(parents, device=ctx.device))
        return Draft(tokens=tokens, tree=rows, present=torch.as_tensor(present, device=ctx.device))


@attrs.frozen
class RandomPruneConfig:
    layer: int = 1
    keep: float = 0.7
    seed: int = 0


class RandomPruner:
    def __init__(self, config: RandomPruneConfig):
        self.cfg = config
        self.gen = torch.Generator().manual_seed(config.seed)

    @propd.hookimpl
    def propd_prune_layer(self):
        return self.cfg.layer

    @propd.hookimpl
    def propd_prune(self, draft, layer):
        assert layer == self.cfg.layer  # the decoder calls a pruner at its declared layer only
        keep = torch.rand(draft.tokens.shape, generator=self.gen) < self.cfg.keep
        return keep.to(draft.tokens.device)


@propd.hookimpl
def propd_register_components(register):
    register("proposer", "oracle", OracleProposer, OracleConfig, "test only: the true continuation, corrupted")
    register("pruner", "random", RandomPruner, RandomPruneConfig, "test only: keep each node with probability keep")
