"""Pruners ``early-topk`` and ``early-prob``: ProPD's early pruning (Zhong et al. 2024, arXiv 2402.13485, sec. 4.1).

After n layers, an early-exit head (``propd train-heads``) turns each tree node's hidden state into a prediction of
the next token. A child whose token is unlikely under its parent's early prediction is pruned with its whole
subtree, so layers n+1..L, the vocabulary projection and the verifier only see the survivors.

* ``early-topk`` (the paper's criterion): keep child x_{i+1} iff x_{i+1} is in TopK(x_i) of the early head.
* ``early-prob`` (the alternative the paper compares against): a path's estimated probability is the product of
  the early head's probabilities along it; prune nodes whose path probability is under ``threshold``, and
  optionally keep only the ``max_nodes`` most probable.

Only nodes with children need early logits, so on a shared tree the vocabulary projection runs on its internal
nodes only. The early heads reach the pruner through ``propd_setup`` (``model.early_heads``).
The decoder closes the keep-mask under ancestry and never drops the root, so pruning changes the work, never the
output.
"""

from __future__ import annotations

import math

import attrs
import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.tree import DraftTree


def _positive(_, attribute, value):
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen
class EarlyTopKConfig:
    layer: int = attrs.field(default=4, validator=_positive)
    k: int = attrs.field(default=50, validator=_positive)
    min_nodes: int = attrs.field(default=2, validator=_positive)  # trees smaller than this are not pruned


@attrs.frozen
class EarlyProbConfig:
    layer: int = attrs.field(default=4, validator=_positive)
    threshold: float = attrs.field(default=0.01, validator=_positive)
    max_nodes: int | None = attrs.field(default=None, validator=_positive)
    min_nodes: int = attrs.field(default=2, validator=_positive)


class _EarlyPruner:
    """``min_nodes``: trees with fewer nodes are left whole. Pruning a small tree saves little layer work (on a
    CPU, 2-4 rows cost about what 1 row does: the weights' memory traffic dominates) but still pays for the early
    vocabulary projection and can drop a node the full model would have accepted, lowering the accepted length.
    The paper prunes every tree (``min_nodes`` 2, the default)."""

    layer: int
    min_nodes: int

    @hookimpl
    def propd_setup(self, model):
        L = model.config.num_layers
        if not 1 <= self.layer < L:
            raise PropdError(f"pruning after layer {self.layer} is out of range: the model has {L} layers "
                             f"(use layer=1..{L - 1})")
        if self.layer not in model.early_heads:
            have = sorted(model.early_heads) or "none"
            raise PropdError(f"pruning after layer {self.layer} needs an early head for that layer (loaded: {have}); "
                             f"train one with `propd train-heads --early-layers {self.layer}`")
        self.head = model.early_heads[self.layer]  # hidden after n layers (.., H) -> next-token logits (.., V)

    @hookimpl
    def propd_prune_layer(self):
        return self.layer

    def _parent_scores(self, draft, nodes, hidden, score):
        """``score(logits (B, N, V))`` -> (B, N, ...) for the early head's prediction at each node's parent, as
        (B, T-1, ...) for nodes 1..T-1. The vocabulary projection runs once per node with children: on a shared tree
        only its internal nodes; on per-row trees every live node."""
        tree = draft.tree
        B = hidden.shape[0]
        if isinstance(tree, DraftTree):
            at = tree.internal.expand(B, -1)  # (B, I)
            s = score(self.head(nodes.gather(hidden, at)))  # (B, I, ...)
            return s[:, tree.parent_slot[1:]]
        s = score(self.head(hidden))  # (B, T', ...)
        parents = draft.rows.parents[:, 1:]  # (B, T-1)
        return nodes.gather(s, parents)


class EarlyTopKPruner(_EarlyPruner):
    def __init__(self, config: EarlyTopKConfig):
        self.layer, self.k, self.min_nodes = config.layer, config.k, config.min_nodes

    @hookimpl
    def propd_prune(self, draft, nodes, hidden):
        if draft.num_nodes < max(2, self.min_nodes):
            return None
        top = self._parent_scores(draft, nodes, hidden,
                                  lambda lg: lg.topk(min(self.k, lg.shape[-1]), dim=-1).indices)  # (B, T-1, k)
        member = (top == draft.tokens[:, 1:, None]).any(dim=-1)  # (B, T-1): child in its parent's top-k
        return torch.cat([torch.ones_like(member[:, :1]), member], dim=1)


class EarlyProbPruner(_EarlyPruner):
    def __init__(self, config: EarlyProbConfig):
        self.layer, self.threshold, self.max_nodes = config.layer, config.threshold, config.max_nodes
        self.min_nodes = config.min_nodes

    @hookimpl
    def propd_prune(self, draft, nodes, hidden):
        if draft.num_nodes < max(2, self.min_nodes):
            return None
        T = draft.num_nodes
        logp = self._parent_scores(draft, nodes, hidden, lambda lg: torch.log_softmax(lg.float(), dim=-1))
        edge = logp.gather(2, draft.tokens[:, 1:, None])[..., 0]  # (B, T-1): log p(child | parent)
        edge = torch.cat([torch.zeros_like(edge[:, :1]), edge], dim=1)  # the root costs nothing
        path = torch.bmm(draft.rows.mask.to(edge.dtype), edge[..., None])[..., 0]  # (B, T): log-prob of each path
        keep = path >= math.log(self.threshold)
        if self.max_nodes is not None and self.max_nodes < T:
            path = path.masked_fill(~keep, float("-inf"))
            path[:, 0] = float("inf")
            best = path.topk(self.max_nodes, dim=1).indices
            keep = torch.zeros_like(keep).scatter_(1, best, True) & keep
        return keep


@hookimpl
def propd_register_components(register):
    register("pruner", "early-topk", EarlyTopKPruner, EarlyTopKConfig,
             "ProPD early pruning: drop a child not in its parent's early-head top-k (after `layer` layers)")
    register("pruner", "early-prob", EarlyProbPruner, EarlyProbConfig,
             "drop nodes whose early-head path probability is below `threshold` (optionally keep the best max_nodes)")
