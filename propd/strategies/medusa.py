"""Proposer ``medusa``: fill the sizer's tree with the top-k guesses of the Medusa heads (Cai et al. 2023).

A node at depth d reached by ranks (r_1..r_d) gets head (d-1)'s r_d-th most likely token, computed from the hidden
state that produced the root: the sizer's tree paths are read as "rank of head d's guess" here, and only here. With
the chain tree this is blockwise parallel decoding's top-1 proposal (Stern et al. 2018, "Blockwise Parallel Decoding
for Deep Autoregressive Models").
"""

from __future__ import annotations

import attrs
import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.types import Draft


@attrs.frozen
class MedusaConfig:
    """``draft_vocab``: the heads guess among this many most frequent tokens (their ``draft_vocab.json``); None: all
    of that file if the heads have one, else the whole vocabulary; 0: the whole vocabulary. The output never
    depends on it, only how often guesses are right and what they cost (:mod:`propd.models.heads`)."""

    draft_vocab: int | None = attrs.field(default=None)


class MedusaProposer:
    def __init__(self, config: MedusaConfig | None = None):
        self.draft_vocab = (config or MedusaConfig()).draft_vocab
        self.heads = None
        self.num_heads = 0

    @hookimpl
    def propd_setup(self, model):
        if model.heads is None:
            raise PropdError("this preset needs Medusa heads: pass --heads DIR (a Medusa checkpoint), "
                             "or use --preset ar")
        if self.draft_vocab is not None:
            model.heads.draft_size(self.draft_vocab)  # refuses sizes the heads cannot serve
        self.heads = model.heads
        self.num_heads = model.heads.num_heads

    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Token ids (B, K, k) of each head's k most likely guesses from ``hidden`` (B, H), best first."""
        topk = getattr(self.heads, "topk", None)  # MedusaHeads: within the draft vocabulary, if any
        if topk is not None:
            return topk(hidden, k, draft_vocab=self.draft_vocab)
        logits = self.heads(hidden)  # any module mapping (B, H) -> (B, K, V)
        return logits.topk(min(k, logits.shape[-1]), dim=-1).indices

    @hookimpl
    def propd_propose(self, ctx, tree):
        if tree.max_depth > self.num_heads:
            raise PropdError(f"the tree is {tree.max_depth} deep but only {self.num_heads} Medusa heads are loaded")
        top = self.topk(ctx.last_hidden, tree.max_rank + 1)[:, : tree.max_depth]  # (B, D, R)
        flat = top.flatten(1)  # (B, D*R)
        idx = (tree.depths[1:] - 1) * (tree.max_rank + 1) + tree.ranks[1:]  # (T-1,)
        return Draft(tokens=torch.cat([ctx.roots[:, None], flat[:, idx]], dim=1), tree=tree)  # (B, T)


@hookimpl
def propd_register_components(register):
    register("proposer", "medusa", MedusaProposer, MedusaConfig,
             "top-k guesses of Medusa heads, filled into the sizer's tree (draft_vocab=N: guess among N tokens)")
