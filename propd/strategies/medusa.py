"""Proposer ``medusa``: fill the tree with the top-k guesses of the Medusa heads (Cai et al. 2023).

A node at depth d reached by ranks (r_1..r_d) gets head (d-1)'s r_d-th most likely token, computed from the hidden
state that produced the root. With the chain tree this is blockwise parallel decoding's top-1 proposal (Stern et
al. 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models").
"""

from __future__ import annotations

import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl


class MedusaProposer:
    def __init__(self, config=None):
        self.num_heads = 0

    @hookimpl
    def propd_setup(self, model):
        if model.heads is None:
            raise PropdError("this preset needs Medusa heads: pass --heads DIR (a Medusa checkpoint), "
                             "or use --preset ar")
        self.num_heads = model.heads.num_heads

    @hookimpl
    def propd_propose(self, ctx, tree):
        if tree.max_depth > self.num_heads:
            raise PropdError(f"the tree is {tree.max_depth} deep but only {self.num_heads} Medusa heads are loaded")
        top = ctx.head_topk(tree.max_rank + 1)[:, : tree.max_depth]  # (B, D, R)
        flat = top.flatten(1)  # (B, D*R)
        idx = (tree.depths[1:] - 1) * (tree.max_rank + 1) + tree.ranks[1:]  # (T-1,)
        return torch.cat([ctx.roots[:, None], flat[:, idx]], dim=1)  # (B, T)


@hookimpl
def propd_register_components(register):
    register("proposer", "medusa", MedusaProposer, None, "top-k guesses of Medusa heads, filled into the tree")
