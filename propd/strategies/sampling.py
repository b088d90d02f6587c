"""Verifier ``sampling``: tree speculative sampling that keeps the base model's sampling distribution exactly.

Each row walks its tree from the root. At a node with target distribution p (the base model's logits there, processed
by :func:`propd.sampling.probabilities`), its live children are tried in sibling order against a residual r = p:

* a draft with distributions (``Draft.dists``: q at the node, the children drawn from it independently): child x is
  accepted with probability min(1, r(x) / q(x)); on rejection r <- norm(max(r - q, 0)) (SpecInfer's multi-round
  verification, Miao et al. 2024, arXiv 2305.09781, Theorem 4.2; Leviathan et al. 2023 and Chen et al. 2023 for a
  single candidate);
* a deterministic draft (top-k heads, lookup; no ``dists``): children are point masses, child x is accepted with
  probability r(x); on rejection r(x) <- 0 and r is renormalized (sampling without replacement; the first accepted
  child, or the final residual, is then a draw from p).

An accepted child becomes the node; when none is accepted, or at a leaf, the bonus token is drawn from r. Every
emitted token is thus distributed as AR sampling from p, so the output distribution does not depend on the draft,
the tree, pruning (a pruned child is simply not tried) or the batch. Draws come from each row's own generator
(``ctx.generators``). With temperature 0 (``ctx.sampling`` greedy or None) this is the ``greedy`` verifier.
"""

from __future__ import annotations

import torch

from propd.hookspecs import hookimpl
from propd.sampling import draw, probabilities, uniform
from propd.strategies.greedy import GreedyVerifier
from propd.types import Acceptance


def try_candidate(r: torch.Tensor, x: int, q: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """One candidate token ``x`` against the residual target distribution ``r`` (V,): its acceptance probability,
    and the residual to use if it is rejected. ``q`` (V,) is the draft distribution ``x`` was drawn from, or None for
    a deterministic candidate (a point mass)."""
    if q is not None:
        qx = float(q[x])
        accept = min(1.0, float(r[x]) / qx) if qx > 0 else 0.0
        rest = (r - q).clamp(min=0)
        total = float(rest.sum())
        return accept, (rest / total if total > 0 else r)
    accept = float(r[x])
    if accept >= 1.0:  # cannot be rejected
        return accept, r
    rest = r.clone()
    rest[x] = 0.0
    return accept, rest / rest.sum()


class SamplingVerifier:
    def __init__(self, config=None):
        self._greedy = GreedyVerifier()

    @hookimpl
    def propd_verify(self, ctx, draft, nodes, logits):
        params = ctx.sampling
        if params is None or params.greedy:
            return self._greedy.propd_verify(draft, nodes, logits)
        B, T = draft.tokens.shape
        rows = draft.rows
        at = nodes.position(torch.arange(T, device=logits.device).expand(B, T)).tolist()  # node -> live position
        alive, parents, tokens = nodes.alive().tolist(), rows.parents.tolist(), draft.tokens.tolist()
        dists = draft.dists
        best, bonus = [], []
        for b in range(B):
            g = ctx.generators[b]
            children: dict[int, list[int]] = {}
            for i in range(1, T):
                if alive[b][i]:
                    children.setdefault(parents[b][i], []).append(i)
            node = 0
            while True:
                kids = children.get(node, [])
                q = dists[b, node].float() if dists is not None else None  # node's children were drawn from q
                r = probabilities(logits[b, at[b][node]], params)  # (V,): only at the nodes the walk visits
                taken = None
                for c in kids:
                    accept, residual = try_candidate(r, tokens[b][c], q)
                    if uniform(g) < accept:
                        taken = c
                        break
                    r = residual
                if taken is None:
                    best.append(node)
                    bonus.append(draw(r, g))
                    break
                node = taken
        dev = draft.tokens.device
        best_t = torch.tensor(best, dtype=torch.long, device=dev)
        return Acceptance(best=best_t, accept_len=rows.depth_at(best_t),
                          bonus=torch.tensor(bonus, dtype=torch.long, device=dev))


@hookimpl
def propd_register_components(register):
    register("verifier", "sampling", SamplingVerifier, None,
             "tree speculative sampling: the base model's sampling distribution exactly (temperature, top-k, top-p)")
