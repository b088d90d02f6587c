"""Test-only propd components, shipped as a third-party plugin package (entry-point group ``propd``).

* proposer ``oracle``: knows each prompt's true greedy continuation and puts it on one random branch of the tree
  (a random rank per depth), fills every other node with random tokens, and corrupts any node with probability
  ``corrupt``; accepted lengths then range from 0 to the tree depth. Used to prove the engine lossless.
* pruner ``random``: after ``layer`` layers keeps each node with probability ``keep``; the engine must still be
  lossless, since pruning may only shorten the accepted path.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

import propd


@attrs.frozen
class OracleConfig:
    continuations: dict = attrs.field(factory=dict)  # prompt index -> greedy continuation token ids
    corrupt: float = 0.2
    seed: int = 0


class OracleProposer:
    def __init__(self, config: OracleConfig):
        self.cfg = config
        self.rng = np.random.default_rng(config.seed)

    @propd.hookimpl
    def propd_propose(self, ctx, tree):
        B, T, V = ctx.batch_size, tree.num_nodes, ctx.vocab_size
        out = self.rng.integers(0, V, size=(B, T))
        paths = ((),) + tree.paths
        for b, row in enumerate(ctx.row_ids):
            cont = self.cfg.continuations.get(row, [])
            start = ctx.num_generated[b] - 1  # continuation index of the root
            right = self.rng.integers(0, tree.max_rank + 1, size=tree.max_depth + 1)
            for j, path in enumerate(paths[1:], start=1):
                d = len(path)
                on_line = all(r == right[i] for i, r in enumerate(path))
                if on_line and start + d < len(cont) and self.rng.random() >= self.cfg.corrupt:
                    out[b, j] = cont[start + d]
        tokens = torch.as_tensor(out, dtype=torch.long, device=ctx.device)
        tokens[:, 0] = ctx.roots
        return tokens


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
    def propd_prune(self, ctx, tree, tokens, layer, hidden, node_idx, valid):
        if layer != self.cfg.layer:
            return None
        keep = torch.rand(tokens.shape, generator=self.gen) < self.cfg.keep
        return keep.to(tokens.device)


@propd.hookimpl
def propd_register_components(register):
    register("proposer", "oracle", OracleProposer, OracleConfig, "test only: the true continuation, corrupted")
    register("pruner", "random", RandomPruner, RandomPruneConfig, "test only: keep each node with probability keep")
