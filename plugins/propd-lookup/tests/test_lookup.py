"""prompt-lookup: lossless on random prompts, finds the matches it should, and drafts per-row tries."""

import sys
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plugin, importable without installing it
import propd_lookup  # noqa: E402
from propd.testing import assert_lossless, random_prompts, tiny_model  # noqa: E402
from propd_lookup import LookupConfig, PromptLookupProposer, find_matches, host_continuations  # noqa: E402

MODEL = tiny_model(seed=3, heads=4)
TREE_MODEL = tiny_model(seed=4, heads=4, early=(1, 2), drafter=True)


def looping(seed: int, lengths) -> list[list[int]]:
    """Prompts that repeat a random span: something to look up."""
    return [p + p[: max(1, n // 2)] for p, n in zip(random_prompts(MODEL, seed, lengths), lengths)]


@settings(deadline=None, max_examples=30, derandomize=True)
@given(lens=st.lists(st.integers(1, 16), min_size=1, max_size=6), seed=st.integers(0, 10_000),
       max_ngram=st.integers(1, 8), max_tokens=st.integers(1, 12), matches=st.integers(1, 4),
       budget=st.sampled_from([2, 4, 8, 16]), max_new=st.integers(1, 24), repeat=st.booleans(),
       factor=st.sampled_from([0, 1, 1.5]))
def test_prompt_lookup_is_lossless(lens, seed, max_ngram, max_tokens, matches, budget, max_new, repeat, factor):
    prompts = looping(seed, lens) if repeat else random_prompts(MODEL, seed, lens)
    cfg = LookupConfig(max_ngram=max_ngram, min_ngram=1, max_tokens=max_tokens, max_matches=matches,
                       length_factor=factor)
    res = assert_lossless(MODEL, prompts, max_new, sizer=("static", {"tree": f"chain:{budget - 1}"}),
                          proposer=PromptLookupProposer(cfg), plugins=[propd_lookup])
    assert all(s.tree_nodes <= budget for s in res.stats)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(lens=st.lists(st.integers(1, 16), min_size=1, max_size=4), seed=st.integers(0, 10_000),
       preset=st.sampled_from(["lookup", "propd-lookup", "medusa+lookup", "eagle+lookup", "propd-eagle+lookup"]),
       prune=st.booleans())
def test_presets_and_pruning_are_lossless(lens, seed, preset, prune):
    model = TREE_MODEL
    pruners = [("early-topk", {"layer": 1, "k": 8})] if prune else None
    assert_lossless(model, looping(seed, lens), 20, preset=preset, pruners=pruners, plugins=[propd_lookup])


def test_eagle_lookup_adds_a_match_to_the_drafters_tree():
    """``eagle+lookup``: a row whose last two tokens (the prompt's last and the first generated) occurred before
    verifies the 3 tokens that followed them (1.5 x the match's length); a row without a match, EAGLE's 3 nodes."""
    from propd.testing import ar_reference

    tail, first = list(range(40, 52)), 0
    for _ in range(8):  # a prompt "tail[-1] first ... tail" whose greedy continuation is ``first``: a 2-gram match
        prompt = [tail[-1], first] + list(range(60, 66)) + tail
        nxt = ar_reference(TREE_MODEL, [prompt], 1)[0][0]
        if nxt == first:
            break
        first = nxt
    assert nxt == first
    matched = assert_lossless(TREE_MODEL, [prompt], 4, preset="eagle+lookup", plugins=[propd_lookup])
    assert matched.stats[0].tree_nodes == 4  # the root and 3 tokens after the 2-token match
    fresh = assert_lossless(TREE_MODEL, [tail], 4, preset="eagle+lookup", plugins=[propd_lookup])
    assert fresh.stats[0].tree_nodes == 3


def test_dynamic_sizing_drives_lookup():
    res = assert_lossless(MODEL, looping(5, [6, 11, 4]), 40, sizer="propd-dynamic", proposer="prompt-lookup",
                          plugins=[propd_lookup])
    # the sizer explores tree budgets first, but a budget spent where the lookup matched nothing runs one node (and is
    # priced as what choosing it costs); trees of lookup drafts run once matches appear
    assert any(s.tree_nodes > 1 for s in res.stats)


def test_draft_is_a_trie_of_the_best_matches_per_row():
    """Row 0 ends with "1 2 3", seen twice before with different continuations; row 1 has no match."""
    from propd.types import StepContext

    rows = [[1, 2, 3, 4, 5, 9, 1, 2, 3, 6, 7, 8, 1, 2, 3], [10, 11, 12]]
    C = 20
    history = torch.zeros(2, C, dtype=torch.long)
    for b, r in enumerate(rows):
        history[b, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) - 1 for r in rows])  # committed tokens: all but the root
    ctx = StepContext(step=0, row_ids=(0, 1), lengths=lengths, host_lengths=tuple(lengths.tolist()),
                      num_generated=(1, 1), roots=torch.tensor([3, 12]), last_hidden=torch.zeros(2, 4),
                      vocab_size=16, device=torch.device("cpu"), history=history)
    from propd import DraftTree

    prop = PromptLookupProposer(LookupConfig(max_ngram=3, max_tokens=3, max_matches=2))
    draft = prop.propd_propose(ctx, DraftTree.chain(8))
    assert draft.present[1].tolist() == [True] + [False] * (draft.num_nodes - 1)  # no match: the root alone
    real = draft.present[0]
    toks, parents = draft.tokens[0][real].tolist(), draft.rows.parents[0][real].tolist()
    # the latest match first (6 7 8), then the earlier one (4 5 9), both below the root
    assert toks == [3, 6, 7, 8, 4, 5, 9] and parents == [-1, 0, 1, 2, 0, 4, 5]
    small = PromptLookupProposer(LookupConfig(max_ngram=3, max_tokens=3, max_matches=2))
    assert small.propd_propose(ctx, DraftTree.chain(4)).present[0].sum() == 5  # the budget caps the nodes


def _expected(seq: list[int], cfg: LookupConfig) -> list[list[int]]:
    """The reference search on one row, in plain Python: best matches' continuations, best first."""
    import math

    found = {}
    for n in range(cfg.max_ngram, cfg.min_ngram - 1, -1):
        if len(seq) < n + 1:
            continue
        suffix = seq[-n:]
        for s in range(len(seq) - n):
            if n < cfg.min_ngram:
                continue
            if seq[s: s + n] == suffix and s + n <= len(seq) - 1:
                p = s + n
                found[p] = max(found.get(p, 0), n * 10_000 + p)
    order = sorted(found, key=lambda p: -found[p])[: cfg.max_matches]
    longest = [cfg.max_tokens if cfg.length_factor == 0 else
               min(cfg.max_tokens, math.ceil(cfg.length_factor * (found[p] // 10_000))) for p in order]
    return [seq[p: p + n] for p, n in zip(order, longest)]


@settings(deadline=None, max_examples=80, derandomize=True)
@given(rows=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), min_size=1, max_size=4),
       max_ngram=st.integers(1, 9), min_ngram=st.integers(1, 3), max_tokens=st.integers(1, 6),
       matches=st.integers(1, 4), factor=st.sampled_from([0, 0.5, 1, 1.5, 2]))
def test_find_matches_equals_a_plain_search(rows, max_ngram, min_ngram, max_tokens, matches, factor):
    cfg = LookupConfig(max_ngram=max(max_ngram, min_ngram), min_ngram=min_ngram, max_tokens=max_tokens,
                       max_matches=matches, length_factor=factor)
    C = max(len(r) for r in rows) + 5
    history = torch.full((len(rows), C), 7)  # scratch past each row's length must never match
    for b, r in enumerate(rows):
        history[b, : len(r)] = torch.tensor(r)
    tokens, real = find_matches(history, torch.tensor([len(r) for r in rows]), cfg)
    for b, r in enumerate(rows):
        got = [[t for t, ok in zip(seq, oks) if ok] for seq, oks in zip(tokens[b].tolist(), real[b].tolist())]
        want = _expected(r, cfg)
        assert [g for g in got if g] == want
    assert host_continuations(history, torch.tensor([len(r) for r in rows]), cfg) == [_expected(r, cfg) for r in rows]


@settings(deadline=None, max_examples=10, derandomize=True)
@given(lens=st.lists(st.integers(1, 16), min_size=1, max_size=4), seed=st.integers(0, 10_000),
       max_new=st.integers(1, 24))
def test_the_host_and_device_searches_draft_the_same(lens, seed, max_new):
    """On a CPU the proposer searches on the host; the device search (a GPU's) gives the same steps."""
    prompts = looping(seed, lens)
    runs = []
    for host in (True, False):
        proposer = PromptLookupProposer(LookupConfig())
        proposer.host_search = host
        res = assert_lossless(MODEL, prompts, max_new, sizer=("static", {"tree": "chain:10"}), proposer=proposer,
                              plugins=[propd_lookup])
        runs.append([(s.tree_nodes, s.row_ids) for s in res.stats] + [res.accept_lengths])
    assert runs[0] == runs[1]
