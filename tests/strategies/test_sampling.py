"""Sampling: every preset samples exactly the base model's distribution (temperature, top-k, top-p), reproducibly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2

from conftest import tiny_loaded
from propd import Decoder, PropdError
from propd.sampling import SamplingParams, probabilities
from propd.types import Draft
from propd_oracle import OracleConfig, OracleProposer, RandomPruneConfig, RandomPruner

MODEL = tiny_loaded(seed=3, heads=4, early=(1, 2), drafter=True)
PROMPT = [5, 17, 42, 9]
SETTINGS = dict(temperature=0.8, top_k=5, top_p=0.95)


def next_probs(prefixes: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """The processed next-token distribution (N, V) after each prefix, straight from the model's forward."""
    m = MODEL.model
    with torch.inference_mode():
        cache = m.new_cache(len(prefixes), max(map(len, prefixes)) + 2)
        hidden, _ = m.hidden_states(cache, prefixes)
        last = hidden[torch.arange(len(prefixes)), torch.tensor([len(p) for p in prefixes]) - 1]
        return probabilities(m.logits(last), params)


def exact_joint(n: int, params: SamplingParams) -> dict[tuple, float]:
    """P(first n generated tokens) under AR sampling, by enumerating the support."""
    dist = {(): 1.0}
    for _ in range(n):
        prefixes = list(dist)
        p = next_probs([PROMPT + list(t) for t in prefixes], params)
        nxt = {}
        for i, t in enumerate(prefixes):
            for x in torch.nonzero(p[i] > 0).flatten().tolist():
                nxt[t + (x,)] = dist[t] * float(p[i, x])
        dist = nxt
    return dist


def chi_square_p(counts: dict[tuple, int], probs: dict[tuple, float]) -> float:
    """p-value of the counts under the exact distribution (cells with expected < 5 pooled)."""
    total = sum(counts.values())
    assert set(counts) <= set(probs), "a sample outside the distribution's support"
    cells, pool_e, pool_o = [], 0.0, 0
    for key, p in probs.items():
        e, o = p * total, counts.get(key, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
        else:
            cells.append((o, e))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return float(chi2.sf(stat, len(cells) - 1))


def samples(n_tokens: int, rows: int, batch_size: int, **decoder) -> dict[tuple, int]:
    dec = Decoder(MODEL, **decoder)
    res = dec.generate_ids([PROMPT] * rows, max_new_tokens=n_tokens, batch_size=batch_size, seed=11, **SETTINGS)
    counts: dict[tuple, int] = {}
    for t in res.token_ids:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    return counts, res


def greedy_refs(n):
    return Decoder(MODEL, preset="ar").generate_ids([PROMPT], max_new_tokens=n).token_ids[0]


class DistProposer:
    """Children drawn independently from a draft distribution q (random logits), with ``dists`` given: the
    min(1, p/q) acceptance path of the verifier."""

    def __init__(self, width=3, depth=2, seed=0):
        from propd import DraftTree

        self.tree = DraftTree.from_paths([(r,) for r in range(width)] + [(r, s) for r in range(width)
                                                                          for s in range(width)][: width * depth])
        self.g = torch.Generator().manual_seed(seed)

    def propd_propose(self, ctx, tree):
        B, T, V = ctx.batch_size, self.tree.num_nodes, ctx.vocab_size
        q = probabilities(torch.randn(B, T, V, generator=self.g) * 2, SamplingParams(temperature=1.0, top_k=8))
        tokens = torch.empty(B, T, dtype=torch.long)
        tokens[:, 0] = ctx.roots
        parents = self.tree.parents.tolist()
        for i in range(1, T):
            tokens[:, i] = torch.multinomial(q[:, parents[i]], 1, generator=self.g)[:, 0]
        return Draft(tokens=tokens, tree=self.tree, dists=q)


DistProposer.propd_propose = __import__("propd").hookimpl(DistProposer.propd_propose)

CASES = {
    "ar": dict(preset="ar"),
    "bpd": dict(preset="bpd"),
    "medusa": dict(preset="medusa"),
    # the pruned mc_sim tree (a fixed tree: propd-dynamic's choice of size depends on the machine's timing)
    "propd-prune-only": dict(preset="propd-prune-only", pruners=[("early-topk", {"layer": 2, "k": 4})]),
    "oracle-per-row-pruned": dict(sizer=("static", {"tree": "chain:6"}),
                                  proposer=OracleProposer(OracleConfig(continuations={i: greedy_refs(3)
                                                                                      for i in range(4000)},
                                                                       corrupt=0.2, per_row=True)),
                                  pruners=[RandomPruner(RandomPruneConfig(layer=1, keep=0.8))]),
    "draft-distributions": dict(sizer=("static", {"tree": "chain:9"}), proposer=DistProposer()),
    # a random drafter: wide enough (16 of 128 tokens per node) that some of its guesses are drawn
    "eagle": dict(sizer=("static", {"tree": "budget:24:3"}), proposer=("eagle", {"top_k": 16, "depth": 3})),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 4])
def test_every_preset_samples_the_exact_distribution(case, batch):
    exact = exact_joint(3, SamplingParams(**SETTINGS))
    rows = 3000 if batch == 4 else 600  # batch 1 runs one prompt at a time: fewer samples
    counts, res = samples(3, rows, batch, **CASES[case])
    assert chi_square_p(counts, exact) > 1e-3
    if case != "ar":
        assert max(a for s in res.stats for a in s.accepted) > 1  # drafts were accepted: not AR in disguise


def test_temperature_zero_is_greedy_and_seeds_repeat():
    greedy = Decoder(MODEL, preset="medusa").generate_ids([PROMPT, [1, 2]], max_new_tokens=12).token_ids
    assert Decoder(MODEL, preset="medusa").generate_ids([PROMPT, [1, 2]], max_new_tokens=12, temperature=0,
                                                        seed=5).token_ids == greedy
    dec = Decoder(MODEL, preset="medusa")
    a = dec.generate_ids([PROMPT, PROMPT, [1, 2]], max_new_tokens=16, seed=3, **SETTINGS).token_ids
    assert "verifier 'sampling'" in str(dec._fault("verifier", "x"))  # errors name the verifier that ran
    b = dec.generate_ids([PROMPT, PROMPT, [1, 2]], max_new_tokens=16, seed=3, **SETTINGS).token_ids
    c = dec.generate_ids([PROMPT, PROMPT, [1, 2]], max_new_tokens=16, seed=4, **SETTINGS).token_ids
    assert a == b and a != c
    # prompt i draws from its own generator: its sample does not depend on the batch it runs in
    ar = Decoder(MODEL, preset="ar")
    together = ar.generate_ids([PROMPT, PROMPT, [1, 2]], max_new_tokens=16, seed=3, **SETTINGS).token_ids
    alone = ar.generate_ids([PROMPT, PROMPT, [1, 2]], max_new_tokens=16, seed=3, batch_size=1, **SETTINGS).token_ids
    assert together == alone and together[0] != together[1]  # copies of one prompt: independent samples


@pytest.mark.parametrize("preset", ["ar", "medusa", "eagle"])
def test_samples_do_not_depend_on_when_a_prompt_joins(preset):
    """Prompt i draws from its own generator whether it waits for a place and joins a running batch (continuous
    batching) or starts in a fixed batch."""
    from propd.testing import joined_steps

    prompts = [PROMPT, [1, 2], [7, 7, 3], PROMPT, [4, 9, 9, 2, 11]]
    runs = [Decoder(MODEL, preset=preset, continuous=c).generate_ids(prompts, max_new_tokens=14, seed=2, batch_size=2,
                                                                     **SETTINGS) for c in (True, False)]
    assert runs[0].token_ids == runs[1].token_ids
    lengths = {len(t) for t in runs[0].token_ids}
    assert joined_steps(runs[1].stats) == 0 and (joined_steps(runs[0].stats) > 0 or lengths == {14})


@settings(deadline=None, max_examples=40, derandomize=True)
@given(logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12), temperature=st.floats(0.1, 3),
       top_k=st.integers(0, 12), top_p=st.floats(0.05, 1.0))
def test_processing_keeps_the_top_tokens_and_sums_to_one(logits, temperature, top_k, top_p):
    z = torch.tensor(logits)
    p = probabilities(z, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5) and bool((p >= 0).all())
    kept = p > 0
    assert kept[z.argmax()]  # the most likely token always survives
    if 0 < top_k < len(logits):
        assert int(kept.sum()) <= top_k + int((z == z.topk(top_k).values[-1]).sum()) - 1
    full = torch.softmax(z / temperature, dim=0)
    if top_k == 0 and top_p == 1.0:
        assert torch.allclose(p, full, atol=1e-6)
    # any token kept is at least as likely as every token dropped
    if (~kept).any():
        assert float(full[kept].min()) >= float(full[~kept].max()) - 1e-6


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature must be >= 0"), (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"), (dict(top_k=-1), "top_k must be"), (dict(seed=-3), "seed must be"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(PropdError, match=match):
        Decoder(MODEL, preset="ar").generate_ids([PROMPT], max_new_tokens=4, **bad)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(logits=st.lists(st.floats(-4, 4), min_size=2, max_size=10), picks=st.lists(st.integers(0, 9), max_size=6),
       seed=st.integers(0, 1000), with_q=st.booleans())
def test_candidate_rule_leaves_the_target_distribution(logits, picks, seed, with_q):
    """Analytically, for any candidates: P(output = x) = p(x), where the output is the first accepted candidate or,
    when all are rejected, a draw from the last residual. Point masses: each distinct candidate is taken with exactly
    p(x). With a draft distribution q, candidates are i.i.d. draws from q: average over every sequence of draws."""
    from itertools import product

    from propd.strategies.sampling import try_candidate

    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
    V = len(logits)
    if not with_q:
        xs = [x % V for x in picks]
        out, reach, r = torch.zeros(V, dtype=torch.float64), 1.0, p
        for x in xs:
            a, r_next = try_candidate(r, x, None)
            out[x] += reach * a
            reach *= 1 - a
            r = r_next
        out += reach * r
        assert torch.allclose(out, p, atol=1e-9)
        return
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, dim=0)
    k = min(len(picks), 2) if V <= 6 else min(len(picks), 1)  # enumerate all V**k draw sequences exactly
    out = torch.zeros(V, dtype=torch.float64)
    for xs in product(range(V), repeat=k):
        weight, reach, r = float(torch.prod(q[list(xs)])) if xs else 1.0, 1.0, p
        for x in xs:
            a, r_next = try_candidate(r, x, q)
            out[x] += weight * reach * a
            reach *= 1 - a
            r = r_next
        out += weight * reach * r
    assert torch.allclose(out, p, atol=1e-9)
