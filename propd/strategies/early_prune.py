"""Pruners ``early-topk`` and ``early-prob``: ProPD's early pruning (Zhong et al. 2024, arXiv 2402.13485, sec. 4.1).

After n layers, an early-exit head (``propd train-heads``) turns each tree node's hidden state into a prediction of
the next token. A child whose token is unlikely under its parent's early prediction is pruned with its whole
subtree, so layers n+1..L, the vocabulary projection and the verifier only see the survivors.

* ``early-topk`` (the paper's criterion): keep child x_{i+1} iff x_{i+1} is in TopK(x_i) of the early head.
* ``early-prob`` (the alternative the paper compares against): a path's estimated probability is the product of
  the early head's probabilities along it; prune nodes whose path probability is under ``threshold``, and
  optionally keep only the ``max_nodes`` most probable.

Only nodes with children need early logits, so the vocabulary projection runs on the tree's internal nodes only.
The decoder closes the keep-mask under ancestry and never drops the root, so pruning changes the work, never the
output.
"""

from __future__ import annotations

import math

import attrs
import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.tree import positions_of


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

    def _skip(self, tree, layer) -> bool:
        return layer != self.layer or tree.num_nodes < max(2, self.min_nodes)

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

    @hookimpl
    def propd_prune_layer(self):
        return self.layer

    def _parent_logits(self, ctx, tree, hidden, node_idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-head logits (B, I, V) of the I internal nodes, and the index (T-1,) of each non-root node's parent
        among them: the projection runs once per internal node, not once per child."""
        B = hidden.shape[0]
        pos = positions_of(node_idx, tree.internal.expand(B, -1), tree.num_nodes)  # (B, I)
        h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, I, H)
        return ctx.early_heads[self.layer](h), tree.parent_slot[1:]  # (B, I, V), (T-1,)


class EarlyTopKPruner(_EarlyPruner):
    def __init__(self, config: EarlyTopKConfig):
        self.layer, self.k, self.min_nodes = config.layer, config.k, config.min_nodes

    @hookimpl
    def propd_prune(self, ctx, tree, tokens, layer, hidden, node_idx, valid):
        if self._skip(tree, layer):
            return None
        logits, slot = self._parent_logits(ctx, tree, hidden, node_idx)
        top = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices  # (B, I, k)
        member = (top[:, slot] == tokens[:, 1:, None]).any(dim=-1)  # (B, T-1): child in its parent's top-k
        return torch.cat([torch.ones_like(member[:, :1]), member], dim=1)


class EarlyProbPruner(_EarlyPruner):
    def __init__(self, config: EarlyProbConfig):
        self.layer, self.threshold, self.max_nodes = config.layer, config.threshold, config.max_nodes
        self.min_nodes = config.min_nodes

    @hookimpl
    def propd_prune(self, ctx, tree, tokens, layer, hidden, node_idx, valid):
        if self._skip(tree, layer):
            return None
        logits, slot = self._parent_logits(ctx, tree, hidden, node_idx)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, I, V)
        edge = logp[:, slot].gather(2, tokens[:, 1:, None])[..., 0]  # (B, T-1): log p(child | parent)
        edge = torch.cat([torch.zeros_like(edge[:, :1]), edge], dim=1)  # the root costs nothing
        path = edge @ tree.mask.to(edge.dtype).T  # (B, T): log of the product along each root path
        keep = path >= math.log(self.threshold)
        if self.max_nodes is not None and self.max_nodes < tree.num_nodes:
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
