"""Prompt-lookup drafting for propd, as a third-party plugin (entry-point group ``propd``).

Proposer ``prompt-lookup`` (prompt lookup decoding, Saxena 2023; transformers' ``prompt_lookup_num_tokens``;
llama.cpp's lookup decoding): a row's last n tokens (n from ``max_ngram`` down to ``min_ngram``) are searched for in
its own history (prompt + generated ids, ``ctx.history``); the tokens that followed the ``max_matches`` best matches
(longest n first, then the most recent) are proposed, merged into a per-row trie of at most the sizer's budget of
nodes, each branch at most ``max_tokens`` long and, after a match of n tokens, at most ceil(``length_factor`` * n):
a 1-token match is a weak guess (2 tokens drafted), a match of 7 or more tokens usually a copy in progress (all 10).
A row without a match drafts nothing (its root alone); when no row matches the step is a plain AR step. Summaries,
retrieval-augmented answers and code edits copy long spans of their input, which is where this pays.

On a GPU the search runs on the device over the whole history at once, (B, C) ids against (B, max_ngram) suffixes,
and one small transfer per step brings the candidates to the host to build the tries; on a CPU it runs on the host
from the occurrences of the row's last id only (``host_continuations``, the same matches). The defaults
(``max_ngram`` 8, ``length_factor`` 1.5) were chosen on task requests over held-out training prompts
(``benchmarks/lookup_length.py``); ``max_ngram=3,length_factor=0`` drafts as transformers'
``prompt_lookup_num_tokens=10`` does.

Presets ``lookup`` (a budget of ``max_tokens`` + 1 nodes), ``propd-lookup`` (the budget chosen online by ProPD's
``propd-dynamic`` sizer), ``medusa+lookup`` (a lookup match first, Medusa's mc_sim_7b_63 guesses in the rest of a
64-node budget), ``eagle+lookup`` (the best match of the last 2-8 tokens, up to 10 tokens, or where there is none
the ``eagle`` preset's 3-node tree) and ``propd-eagle+lookup`` (those drafts in a budget chosen online), through propd's
``composite`` proposer.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch

import propd
from propd.errors import PropdError
from propd.tree import TrieRows
from propd.types import Draft


def _positive(_, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class LookupConfig:
    max_ngram: int = attrs.field(default=8, validator=_positive)  # longest suffix searched for
    min_ngram: int = attrs.field(default=1, validator=_positive)  # shortest
    max_tokens: int = attrs.field(default=10, validator=_positive)  # longest branch (tokens after the root)
    max_matches: int = attrs.field(default=3, validator=_positive)  # branches per row
    # > 0: a branch after a match of n ids is at most ceil(length_factor * n) tokens long (SuffixDecoding's adaptive
    # speculation length, Oliaro et al. 2024, arXiv 2411.04975: a longer match predicts a longer copy)
    length_factor: float = attrs.field(default=1.5, converter=float, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) is above max_ngram ({self.max_ngram})")


def find_matches(history: torch.Tensor, lengths: torch.Tensor, cfg: LookupConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate continuations per row: tokens (B, M, L) and which are real (B, M, L), best match first.

    ``history`` (B, C) holds each row's ids at 0 .. lengths[b]-1 (the last one is the root). A continuation start p
    (1 <= p <= lengths[b] - 1) matches n ids when the n ids before p equal the row's last n ids; n counts up to
    ``max_ngram`` (one comparison of (B, C + 1, max_ngram) windows, newest id first, and a running product). Starts
    matching at least ``min_ngram`` ids are ranked by n, then by recency, and propose the ids from p on, up to the end
    of the history and, with ``length_factor``, at most ceil(length_factor * n) of them.
    """
    B, C = history.shape
    dev = history.device
    N = cfg.max_ngram
    padded = torch.cat([history.new_full((B, N), -1), history], dim=1)  # (B, N + C): ids never below 0
    back = torch.arange(N, device=dev)
    suffix = padded.gather(1, lengths[:, None] - 1 - back + N)  # (B, N) the last N ids, newest first
    suffix = torch.where(lengths[:, None] - 1 - back >= 0, suffix, -2)  # before the row's start: matches nothing
    windows = padded.unfold(1, N, 1).flip(-1)  # (B, C + 1, N): windows[b, p] = the N ids before p, newest first
    n = (windows == suffix[:, None, :]).to(torch.int32).cumprod(dim=2).sum(dim=2)  # (B, C + 1) ids matched
    p = torch.arange(C + 1, device=dev)
    ok = (n >= cfg.min_ngram) & (p[None, :] >= 1) & (p[None, :] <= lengths[:, None] - 1)
    score = torch.where(ok, n.long() * (C + 1) + p[None, :], 0)  # longer match first, then the latest start
    M = min(cfg.max_matches, C + 1)
    best, start = score.topk(M, dim=1)  # (B, M): scores and continuation starts
    steps = torch.arange(cfg.max_tokens, device=dev)
    pos = start[..., None] + steps  # (B, M, L)
    tokens = history.gather(1, pos.clamp(max=C - 1).flatten(1)).view(B, M, cfg.max_tokens)
    real = (pos < lengths[:, None, None]) & (best > 0)[..., None]
    if cfg.length_factor > 0:
        limit = torch.ceil(cfg.length_factor * (best // (C + 1)).to(torch.float64))  # (B, M)
        real &= steps < limit[..., None]
    return tokens, real


def host_continuations(history: torch.Tensor, lengths: torch.Tensor, cfg: LookupConfig) -> list[list[list[int]]]:
    """:func:`find_matches`' continuations (each cut to its real ids, best match first) per row, searched on the host:
    ``history`` (B, C) a CPU tensor. Only the starts after an occurrence of the row's last id are extended, one id
    at a time, where the device search compares every start with every suffix length."""
    hist = history.numpy()
    out = []
    for b, L in enumerate(lengths.tolist()):
        h = hist[b, :L]
        p = np.flatnonzero(h[: max(L - 1, 0)] == h[L - 1]) + 1 if L >= 2 else np.zeros(0, dtype=np.int64)
        n = np.ones(len(p), dtype=np.int64)  # ids matched before start p
        alive = np.ones(len(p), dtype=bool)
        for k in range(2, min(cfg.max_ngram, L) + 1):
            ok = alive & (p >= k)
            ok[ok] = h[p[ok] - k] == h[L - k]
            alive = ok
            n += alive
            if not alive.any():
                break
        keep = n >= cfg.min_ngram
        p, n = p[keep], n[keep]
        rows = []
        for i in np.lexsort((-p, -n))[: cfg.max_matches]:  # longer match first, then the latest start
            q, m = int(p[i]), int(n[i])
            length = min(cfg.max_tokens, L - q)
            if cfg.length_factor > 0:
                length = min(length, math.ceil(cfg.length_factor * m))
            rows.append(h[q:q + length].tolist())
        out.append(rows)
    return out


class PromptLookupProposer:
    host_search = True  # a CPU history is searched by host_continuations (False: by find_matches, as on a GPU)

    def __init__(self, config: LookupConfig):
        self.cfg = config

    @propd.hookimpl
    def propd_propose(self, ctx, tree):
        if ctx.history is None:
            raise PropdError("prompt-lookup needs the token history in the step context (propd >= 0.2)")
        if self.host_search and ctx.history.device.type == "cpu":
            seqs = host_continuations(ctx.history, ctx.history_lengths, self.cfg)
        else:
            tokens, real = find_matches(ctx.history, ctx.history_lengths, self.cfg)
            tokens, real = tokens.tolist(), real.tolist()  # the step's one transfer
            seqs = [[[t for t, r in zip(seq, oks) if r] for seq, oks in zip(tokens[b], real[b])]
                    for b in range(len(tokens))]
        trie = TrieRows(ctx.roots.tolist(), tree.num_nodes)
        for b, row in enumerate(seqs):
            for seq in row:
                trie.add_sequence(b, seq)
        return trie.draft(ctx.device)


@propd.hookimpl
def propd_register_components(register):
    register("proposer", "prompt-lookup", PromptLookupProposer, LookupConfig,
             "continuations of the row's last n-gram found earlier in its own prompt and output (Saxena 2023)")


# ``eagle+lookup``: a row with a match of its last 2-8 tokens verifies what followed the latest longest match (at most
# 1.5 times the match's length, 10 tokens), a row without one the drafter's 3-node tree (a step whose every row has a
# match does not draft with EAGLE). Chosen on the EAGLE drafter's held-out training prompts, plain and as task
# requests (``benchmarks/eagle_lookup.py``, docs/results.md): 1-gram matches added more verified nodes than accepted
# tokens on a CPU, and EAGLE's nodes beside a match repaid less than its drafting cost.
EAGLE_LOOKUP = {"parts": ["prompt-lookup:max_ngram=8,min_ngram=2,max_tokens=10,max_matches=1,length_factor=1.5",
                          "eagle:top_k=4"], "budgets": [11, 3], "later": "empty"}
# ``propd-eagle+lookup``: the same drafts in a budget of 1-11 nodes chosen online (at larger batches, where a row's
# extra nodes cost as much as a whole AR step's rows, it falls back to 1-node steps)
EAGLE_LOOKUP_DYNAMIC = {"max_depth": 10, "sizes": [1, 2, 3, 4, 5, 8, 11], "explore": [1, 2, 3, 5, 11],
                        "unseen": "inherit"}


# the static presets' trees are cut in batches to this many token rows per step in all (``static:max_rows``): a
# 10-token branch per row costs little at batch 1, but above it each row's extra nodes cost about as much as more rows.
# Chosen on held-out task requests (``benchmarks/lookup_length.py --batch B --max-rows ...``); at batch 16: AR steps
MAX_ROWS = 16


@propd.hookimpl
def propd_register_presets(register):
    register("lookup", "prompt lookup decoding: continuations of matching n-grams of the prompt and output",
             sizer=("static", {"tree": f"chain:{LookupConfig().max_tokens}", "max_rows": MAX_ROWS}),
             proposer="prompt-lookup")
    register("propd-lookup", "prompt lookup with ProPD's dynamic tree sizing (the budget chosen online)",
             sizer="propd-dynamic", proposer="prompt-lookup")
    register("medusa+lookup", "a prompt-lookup match, then Medusa's guesses, in one 64-node tree",
             sizer=("static", {"tree": "mc_sim_7b_63"}),
             proposer=("composite", {"parts": ["prompt-lookup", "medusa"]}))
    register("eagle+lookup", "a prompt-lookup match of the last 2-8 tokens (up to 10), else EAGLE's 3-node tree",
             sizer=("static", {"tree": "budget:13:2", "max_rows": MAX_ROWS}), proposer=("composite", EAGLE_LOOKUP))
    register("propd-eagle+lookup", "eagle+lookup's drafts with ProPD's dynamic sizing (1-11 nodes, chosen online)",
             sizer=("propd-dynamic", EAGLE_LOOKUP_DYNAMIC), proposer=("composite", EAGLE_LOOKUP))
