"""Verifier ``greedy``: keep the longest tree path that greedy decoding would produce, plus one bonus token.

A node is correct when its token is the base model's argmax at its parent; a node is accepted when it and all its
ancestors are correct; the deepest accepted node wins (the lowest index among equals) and the argmax at it is the
bonus token. The output is exactly greedy decoding's (Stern et al. 2018; Cai et al. 2023).
"""

from __future__ import annotations

import torch

from propd.hookspecs import hookimpl
from propd.types import Acceptance


def full_argmax(tree, logits, node_idx, valid) -> torch.Tensor:
    """Argmax per tree node (B, T) from logits of survivors (B, T', V); -1 where a node did not survive."""
    B, T = logits.shape[0], tree.num_nodes
    pred = torch.full((B, T + 1), -1, dtype=torch.long, device=logits.device)  # column T takes the padding
    pred.scatter_(1, node_idx, torch.where(valid, logits.argmax(dim=-1), -1))
    return pred[:, :T]


def accept_from_correct(tree, correct: torch.Tensor, pred: torch.Tensor) -> Acceptance:
    """Given which nodes are correct (B, T) and per-node next tokens, pick the deepest fully-correct path."""
    correct = correct.clone()
    correct[:, 0] = True
    wrong = (~correct).to(torch.float32)
    accepted = (wrong @ tree.mask.to(torch.float32).T) == 0  # (B, T): all ancestors correct
    score = torch.where(accepted, tree.depths[None, :], -1)
    best = score.argmax(dim=1)  # first maximum: lowest index among the deepest
    return Acceptance(best=best, accept_len=tree.depths[best], bonus=pred.gather(1, best[:, None])[:, 0])


class GreedyVerifier:
    def __init__(self, config=None):
        pass

    @hookimpl
    def propd_verify(self, ctx, tree, tokens, logits, node_idx, valid):
        pred = full_argmax(tree, logits, node_idx, valid)  # (B, T)
        parent_pred = pred.gather(1, tree.parents.clamp(min=0)[None, :].expand_as(pred))
        correct = (tokens == parent_pred) & (pred >= 0)  # pruned nodes are never correct
        return accept_from_correct(tree, correct, pred)


@hookimpl
def propd_register_components(register):
    register("verifier", "greedy", GreedyVerifier, None, "exact greedy verification (lossless)")
