"""Verifier ``greedy``: keep the longest tree path that greedy decoding would produce, plus one bonus token.

A node is correct when its token is the base model's argmax at its parent; a node is accepted when it and all its
ancestors are correct; the deepest accepted node wins (the lowest index among equals) and the argmax at it is the
bonus token. The output is exactly greedy decoding's (Stern et al. 2018; Cai et al. 2023).
"""

from __future__ import annotations

import torch

from propd.hookspecs import hookimpl
from propd.models import cpu_kernel
from propd.types import Acceptance


def full_argmax(nodes, logits) -> torch.Tensor:
    """Argmax per tree node (B, T) from logits of the live nodes (B, T', V); -1 where a node is not live."""
    B, T = logits.shape[0], nodes.num_nodes
    pred = torch.full((B, T + 1), -1, dtype=torch.long, device=logits.device)  # column T takes the padding
    pred.scatter_(1, nodes.node_idx, torch.where(nodes.valid, cpu_kernel.argmax(logits), -1))
    return pred[:, :T]


def accept_from_correct(rows, correct: torch.Tensor, pred: torch.Tensor) -> Acceptance:
    """Given which nodes are correct (B, T) and per-node next tokens (B, T), pick the deepest fully-correct path of
    the per-row trees ``rows`` (:class:`propd.tree.RowTrees`); the lowest index wins among equals."""
    correct = correct.clone()
    correct[:, 0] = True
    accepted = rows.keep_closure(correct)  # (B, T): the node and all its ancestors correct
    score = torch.where(accepted, rows.depths, -1)
    best = score.argmax(dim=1)  # first maximum: lowest index among the deepest
    return Acceptance(best=best, accept_len=rows.depth_at(best), bonus=pred.gather(1, best[:, None])[:, 0])


class GreedyVerifier:
    argmax_only = True  # reads each node's argmax alone: greedy steps may pass logits exact only there

    def __init__(self, config=None):
        pass

    @hookimpl
    def propd_verify(self, draft, nodes, logits):
        if nodes.num_nodes == 1:  # an AR step: the root is accepted, its argmax is the bonus token
            zero = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            return Acceptance(best=zero, accept_len=zero, bonus=cpu_kernel.argmax(logits[:, 0]))
        rows = draft.rows
        pred = full_argmax(nodes, logits)  # (B, T)
        parent_pred = pred.gather(1, rows.parents.clamp(min=0))
        correct = (draft.tokens == parent_pred) & (pred >= 0)  # pruned nodes are never correct
        return accept_from_correct(rows, correct, pred)


@hookimpl
def propd_register_components(register):
    register("verifier", "greedy", GreedyVerifier, None, "exact greedy verification (lossless)")
