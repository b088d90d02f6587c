"""ProPD's components: early pruners, the tree builder, the cost regression and the dynamic sizer."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_loaded
from propd import Decoder, DraftTree, PropdError
from propd.hookspecs import hookimpl
from propd.strategies.dynamic import (CostModel, DriftCostModel, DynamicConfig, DynamicSizer, monotone,
                                     weighted_line)
from propd.strategies.early_prune import EarlyProbConfig, EarlyProbPruner, EarlyTopKConfig, EarlyTopKPruner
from propd.testing import random_prompts
from propd.tree import BestTrees, RowTrees, best_tree, rank_probabilities
from propd.types import Draft
from strategies_ht import tree_paths

MODEL = tiny_loaded(seed=4, heads=4, early=(1, 2))


def prompts_from(seed, lens):
    return random_prompts(MODEL, seed, lens)


def ar(prompts, n):
    return Decoder(MODEL, preset="ar").generate_ids(prompts, max_new_tokens=n).token_ids


@pytest.mark.parametrize("preset", ["propd", "propd-prune-only", "propd-dynamic-only"])
@pytest.mark.parametrize("batch", [1, 4])
def test_propd_presets_are_lossless(preset, batch):
    prompts = prompts_from(batch, [3, 8, 5, 11][:batch])
    overrides = {}
    if preset != "propd-dynamic-only":
        overrides["pruners"] = [("early-topk", {"layer": 2, "k": 8})]
    res = Decoder(MODEL, preset=preset, **overrides).generate_ids(prompts, max_new_tokens=24)
    assert res.token_ids == ar(prompts, 24)
    if preset == "propd-prune-only":
        assert any(s.nodes_after_pruning < s.tree_nodes for s in res.stats)  # it really pruned


@given(paths=tree_paths(max_nodes=16), k=st.integers(1, 40), seed=st.integers(0, 1000),
       threshold=st.sampled_from([1e-4, 1e-2, 0.2]), prob=st.booleans())
def test_early_pruning_is_lossless_on_random_trees(paths, k, seed, threshold, prob):
    prompts = prompts_from(seed, [2 + seed % 7, 5])
    pruner = (("early-prob", {"layer": 1, "threshold": threshold}) if prob else ("early-topk", {"layer": 1, "k": k}))
    dec = Decoder(MODEL, preset="medusa", sizer=("static", {"tree": tuple(paths)}), pruners=[pruner])
    assert dec.generate_ids(prompts, max_new_tokens=10).token_ids == ar(prompts, 10)


def _live(tree, batch=2, seed=0):
    """Random hidden states (B, T, H) for every node of ``tree`` and the all-live layout."""
    from propd.types import LiveNodes

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tree.num_nodes, MODEL.config.hidden_size, generator=g)
    node_idx = torch.arange(tree.num_nodes).expand(batch, -1)
    return LiveNodes(node_idx, torch.ones_like(node_idx, dtype=torch.bool), tree.num_nodes), hidden


def _ctx(batch):
    from propd.types import StepContext

    return StepContext(step=0, row_ids=tuple(range(batch)), lengths=torch.zeros(batch, dtype=torch.long),
                       host_lengths=(0,) * batch, num_generated=(1,) * batch, roots=torch.zeros(batch, dtype=torch.long),
                       last_hidden=torch.zeros(batch, MODEL.config.hidden_size), vocab_size=128,
                       device=torch.device("cpu"))


def _pruner(cls, cfg):
    pruner = cls(cfg)
    pruner.propd_setup(MODEL)
    return pruner


def test_topk_pruner_keeps_exactly_the_children_in_their_parents_topk():
    tree = DraftTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    nodes, hidden = _live(tree)
    logits = MODEL.early_heads[1](hidden)  # (B, T, V)
    top3 = logits.topk(3, dim=-1).indices
    tokens = torch.tensor([[5, int(top3[0, 0, 1]), 99, int(top3[0, 1, 2]), 7, 8],
                           [5, int(top3[1, 0, 0]), int(top3[1, 0, 2]), 1, 2, int(top3[1, 2, 0])]])
    pruner = _pruner(EarlyTopKPruner, EarlyTopKConfig(layer=1, k=3))
    draft = Draft(tokens=tokens, tree=tree)
    keep = pruner.propd_prune(draft, nodes, hidden)
    expect = torch.zeros_like(keep)
    for b in range(2):
        expect[b, 0] = True
        for j in range(1, tree.num_nodes):
            expect[b, j] = bool((top3[b, int(tree.parents[j])] == tokens[b, j]).any())
    assert torch.equal(keep, expect)
    per_row = Draft(tokens=tokens, tree=RowTrees.from_parents(tree.parents.expand(2, -1)))
    assert torch.equal(pruner.propd_prune(per_row, nodes, hidden), keep)  # the per-row path agrees
    small = _pruner(EarlyTopKPruner, EarlyTopKConfig(layer=1, k=3, min_nodes=tree.num_nodes + 1))
    assert small.propd_prune(draft, nodes, hidden) is None  # below min_nodes: left whole
    at_min = _pruner(EarlyTopKPruner, EarlyTopKConfig(layer=1, k=3, min_nodes=tree.num_nodes))
    assert torch.equal(at_min.propd_prune(draft, nodes, hidden), keep)
    closed = tree.keep_closure(keep)
    for b in range(2):
        for j in range(1, tree.num_nodes):
            assert not closed[b, j] or closed[b, int(tree.parents[j])]  # never a node without its parent


def test_prob_pruner_thresholds_path_probability():
    tree = DraftTree.chain(3)
    nodes, hidden = _live(tree, batch=1)
    logp = torch.log_softmax(MODEL.early_heads[1](hidden), dim=-1)[0]  # (T, V)
    tokens = torch.tensor([[1, int(logp[0].argmax()), int(logp[1].argmax()), int(logp[2].argmin())]])
    path = [0.0]
    for j in range(1, 4):
        path.append(path[-1] + float(logp[j - 1, tokens[0, j]]))
    thr = math.exp((path[2] + path[3]) / 2)  # between the last two path probabilities
    draft = Draft(tokens=tokens, tree=tree)
    keep = _pruner(EarlyProbPruner, EarlyProbConfig(layer=1, threshold=thr)).propd_prune(draft, nodes, hidden)
    assert keep[0].tolist() == [True, path[1] >= math.log(thr), True, False]
    capped = _pruner(EarlyProbPruner, EarlyProbConfig(layer=1, threshold=1e-30, max_nodes=2)).propd_prune(
        draft, nodes, hidden)
    assert capped[0].tolist() == [True, True, False, False]


def test_pruners_need_their_early_head():
    with pytest.raises(PropdError, match="early head for that layer"):
        Decoder(MODEL, preset="propd-prune-only", pruners=[("early-topk", {"layer": 3})])
    with pytest.raises(PropdError, match="out of range"):
        Decoder(tiny_loaded(seed=4, heads=4, early=(1, 2), num_layers=2), preset="propd-prune-only",
                pruners=[("early-topk", {"layer": 2})])
    with pytest.raises(PropdError, match="bad options"):
        Decoder(MODEL, preset="propd", pruners=[("early-topk", {"k": 0})])


def test_best_tree_is_connected_and_greedy():
    p = rank_probabilities([[0.6, 0.8, 0.9], [0.4, 0.6, 0.7], [0.3, 0.4, 0.5]])
    assert [round(x, 6) for x in p[0]] == [0.6, 0.2, 0.1]
    paths, values = best_tree(p, 10)
    assert len(paths) == 9 and values == sorted(values, reverse=True)
    assert paths[:3] == [(0,), (0, 0), (1,)]  # 0.6, 0.24, 0.2
    DraftTree.from_paths(paths)  # every prefix present (raises otherwise)
    for size in range(1, 40):  # the dynamic sizer takes a size-s tree as a prefix of the largest search
        small, small_values = best_tree(p, size)
        big, big_values = best_tree(p, 40)
        assert small == big[: size - 1] and small_values == big_values[: size - 1]


@given(st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=1, max_size=5),
       st.lists(st.integers(-1, 70), min_size=1, max_size=6))
def test_a_best_tree_search_read_in_steps_equals_one_search(curves, reads):
    """The sizer reads its search a few sizes at a time (``BestTrees``), in any order: every read must be the prefix
    of the whole search, ties included."""
    p = rank_probabilities([monotone(c) for c in curves])
    whole, whole_values = best_tree(p, 2000)  # every node of a tree 5 deep, 4 wide: 1,364
    search = BestTrees(p)
    for n in reads:
        assert search.paths[:n] == whole[:max(n, 0)] and search.values[:n] == whole_values[:max(n, 0)]
    assert search.values[:] == whole_values  # read whole
    with pytest.raises(TypeError):
        search.values[3]


def test_weighted_regression_fits_known_lines():
    x = torch.tensor([1.0, 4, 8, 16, 32], dtype=torch.float64)
    b0, b1 = weighted_line(x, 0.02 + 0.003 * x, torch.ones(5, dtype=torch.float64))
    assert b0 == pytest.approx(0.02) and b1 == pytest.approx(0.003)
    y = 0.02 + 0.003 * x
    y[0] = 5.0  # an outlier with (almost) no weight barely moves the fit
    b0, b1 = weighted_line(x, y, torch.tensor([1e-9, 1, 1, 1, 1], dtype=torch.float64))
    assert b0 == pytest.approx(0.02, abs=1e-6) and b1 == pytest.approx(0.003, abs=1e-7)
    cm = CostModel(alpha=1.0, lam=0.5)
    for s in (1, 8, 32):
        cm.observe(s, 0.01 + 0.001 * s)
    assert cm.estimate(16) == pytest.approx(0.026, rel=1e-3)
    cm.observe(1, 0.5)  # the 1-node step is off the line (no heads, another kernel path): its own time stands
    assert cm.estimate(1) == 0.5 and cm.estimate(16) == pytest.approx(0.026, rel=1e-3)
    cm.observe(4, 0.011)  # a measured size's own time stands too (CPU kernels make T(i) far from linear) ...
    assert cm.estimate(4) == 0.011
    assert cm.estimate(8) == pytest.approx(0.018, rel=1e-3)  # ... and the line prices the sizes never measured
    prior = CostModel(alpha=1.0, lam=0.5).seeded_from(cm)  # another key: inherited times are not measurements
    assert prior.estimate(4) != pytest.approx(0.011)  # the line through the (down-weighted) priors prices it
    prior.observe(4, 0.02)
    assert prior.estimate(4) == 0.02  # until it is measured at this key


def test_cost_estimates_age():
    cm = CostModel(alpha=0.3, lam=0.05)
    cm.observe(1, 0.10, now=1)
    cm.observe(1, 0.05, now=2)  # measured again next step: the usual EMA
    assert cm.t[1] == pytest.approx(0.7 * 0.10 + 0.3 * 0.05)
    assert cm.age(1, now=10) == 8 and cm.age(4, now=10) == float("inf")
    cm.observe(1, 0.05, now=102)  # 100 steps later (other keys ran): the old estimate keeps 0.7 * exp(-0.05 * 99)
    assert cm.t[1] == pytest.approx(0.05, rel=0.01)


def test_drift_cost_model_prices_sizes_at_todays_speed():
    """Step time = speed x relative cost: a size measured in a slow moment is priced at today's speed, where the
    paper's T_perf^i keeps the slow time until that size runs again (benchmarks/sizer_trace.py saw exactly that)."""
    drift, paper = DriftCostModel(alpha=0.3, lam=0.05), CostModel(alpha=0.3, lam=0.05)
    clock = 0

    def run(size, seconds, times=1):
        nonlocal clock
        for _ in range(times):
            clock += 1
            drift.observe(size, seconds, now=clock)
            paper.observe(size, seconds, now=clock)

    run(1, 0.040, 5)  # a slow moment: 1-node steps take 40 ms and the 8-node tree 52 ms (1.3 AR steps)
    run(8, 0.052)
    run(1, 0.040)
    run(1, 0.030, 40)  # the machine is 25% faster from now on, and only 1-node steps run
    assert drift.estimate(1) == pytest.approx(0.030, rel=0.01)
    assert drift.estimate(8) == pytest.approx(0.039, rel=0.05)  # still 1.3 AR steps
    assert paper.estimate(8) == pytest.approx(0.052)  # 1.73 AR steps: the tree no longer looks worth running


def test_drift_cost_model_attributes_a_slowdown_during_a_long_tree_run_to_the_machine():
    cm = DriftCostModel(alpha=0.3, lam=0.05)
    clock = 0
    for _ in range(4):  # 8 nodes cost 1.25 AR steps
        for size, t in ((1, 0.032), (8, 0.040)):
            clock += 1
            cm.observe(size, t, now=clock)
    for step in range(30):  # then only 8-node trees run while the machine slows down by half
        clock += 1
        cm.observe(8, 0.040 * (1 + 0.5 * (step + 1) / 30), now=clock)
    clock += 1
    cm.observe(1, 0.048, now=clock)  # a 1-node probe confirms the slowdown
    assert cm.estimate(8) / cm.estimate(1) == pytest.approx(1.25, rel=0.08)  # the relative cost held
    assert cm.estimate(8) == pytest.approx(0.060, rel=0.08)  # and the slowdown is not counted twice


def test_drift_cost_model_clips_a_single_stalled_step_and_fits_the_line_to_relative_costs():
    cm = DriftCostModel(alpha=0.3, lam=0.05)
    for clock, (size, t) in enumerate([(1, 0.010), (2, 0.012), (8, 0.018), (32, 0.042)] * 5, start=1):
        cm.observe(size, t, now=clock)
    assert cm.estimate(8) == pytest.approx(0.018, rel=0.02)
    cm.observe(8, 0.090, now=21)  # another process stalled one step five-fold
    assert 0.018 < cm.estimate(8) < 0.025
    cm.observe(1, 0.010, now=22)
    # a size never measured is priced by the weighted line through the relative costs (1.2, 1.8 and 4.2 AR steps)
    b0, b1 = weighted_line(torch.tensor([2.0, 8, 32], dtype=torch.float64),
                           torch.tensor([1.2, 1.8, 4.2], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert cm.estimate(16) == pytest.approx(cm.estimate(1) * (b0 + 16 * b1), rel=0.1)
    prior = DriftCostModel(alpha=0.3, lam=0.05).seeded_from(cm)  # another key: the speed is unknown until measured
    assert prior.estimate(1) == pytest.approx(0.010, rel=0.2)
    prior.observe(1, 0.040, now=30)  # a bigger batch: a 1-node step takes 4x as long ...
    assert prior.estimate(1) == pytest.approx(0.040, rel=0.01)
    relative = cm.estimate(32) / cm.estimate(1)
    assert prior.estimate(32) == pytest.approx(0.040 * relative, rel=0.01)  # ... and the inherited prices follow
    prior.observe(8, 0.200, now=31)  # trees cost far more at this batch size: one step moves every inherited price
    assert prior.estimate(8) > 0.15 and prior.estimate(32) > 2 * 0.040 * relative


def _drive(cost_per_node, steps=120, probe_every=1000, batch=lambda step: 1, time_of=None, sizes=(1, 4, 16, 64),
           explore=(1, 16, 64), heads_right=None, **config):
    """Feed the sizer synthetic step times t(i) = 10 ms + cost_per_node * i (or ``time_of(i)``) and perfect-ish
    acceptance."""
    from propd.types import Acceptance, StepStats

    sizer = DynamicSizer(DynamicConfig(sizes=sizes, explore=explore, refresh=4, probe_every=probe_every, **config))
    sizer.propd_setup(MODEL)
    sizer.P = ([[0.7, 0.8, 0.85, 0.9, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97]] * 4 if heads_right is None  # often right
               else [[heads_right] * 10] * 4)
    per_node = cost_per_node if callable(cost_per_node) else (lambda step: cost_per_node)
    for step in range(steps):
        tree = sizer.propd_tree(_ctx(batch(step)))
        stats = StepStats(step=step, batch_size=1, row_ids=(0,), context_len=0, tree_nodes=tree.num_nodes,
                          nodes_after_pruning=tree.num_nodes, accepted=(1,),
                          step_time_s=(time_of(tree.num_nodes) if time_of else
                                       0.010 * batch(step) + per_node(step) * tree.num_nodes))
        acc = Acceptance(best=torch.zeros(1, dtype=torch.long), accept_len=torch.zeros(1, dtype=torch.long),
                         bonus=torch.zeros(1, dtype=torch.long))
        cost = sizer.costs[sizer.key]
        cost.observe(tree.num_nodes, stats.step_time_s, now=sizer.clock)  # the cost half of propd_after_step
    return sizer


def test_dynamic_sizer_picks_small_trees_when_cost_grows_fast_and_large_when_flat():
    slow = _drive(cost_per_node=0.050)
    # the first key measures the explore sizes once each, smallest first, but stops once a tree step costs more
    # than l(64) 1-node steps: then no larger tree can pay, and measuring the 64-node tree would waste 3.2 s
    assert slow.history[:4] == [1, 1, 16, 1] and 64 not in slow.history
    assert set(slow.history[-100:]) == {1}  # a node costs 5x a base step: l(i)/T(i) is best at 1
    assert set(_drive(cost_per_node=0.00001).history[-100:]) == {64}  # nodes nearly free: the biggest tree wins


def test_dynamic_sizer_finds_a_cheap_size_off_the_line():
    # CPU-like costs: up to 4 nodes cost about a 1-node step (memory-bound), larger trees grow steeply; a line
    # through the large sizes would price 4 nodes like 8. The sizer must use the 4-node tree's measured time.
    def time_of(nodes):
        return 0.010 if nodes <= 4 else 0.010 + 0.004 * nodes

    sizer = _drive(None, time_of=time_of, sizes=(1, 2, 4, 8, 16, 64), explore=(1, 2, 4, 8, 16, 64))
    # each size is explored twice; 8 nodes took 4.2 AR steps, more than l(64), so 16 and 64 are never run
    assert sizer.history[:8] == [1, 1, 2, 2, 4, 4, 8, 8] and not {16, 64} & set(sizer.history)
    assert set(sizer.history[-100:]) == {4}


def test_sizer_never_jumps_past_the_next_size_above_what_it_measured():
    """The weighted line prices sizes never measured; fitted through two noisy small sizes (a 4-node step measured
    faster than a 2-node one) it slopes down, and far beyond them it prices a 48-node tree at half a 1-node step.
    Only the next size above the largest priced one may be chosen."""
    sizer = DynamicSizer(DynamicConfig(sizes=(1, 2, 4, 8, 48)))
    cm = DriftCostModel(alpha=0.3, lam=0.05)
    for clock, (size, t) in enumerate([(1, 0.010), (2, 0.016), (2, 0.016), (4, 0.014), (4, 0.014)], start=1):
        cm.observe(size, t, now=clock)
    assert cm.estimate(48) < cm.estimate(1)  # the line's promise
    values = [0.5] * 47  # l(48) = 24.5: any tree pays on paper
    assert sizer.choose(cm, values) == 8  # the next size up, whose first step measures it
    cm.observe(8, 0.030, now=6)
    cm.observe(8, 0.030, now=7)
    assert sizer.choose(cm, values) == 48  # priced by the line now only one size beyond the largest measured
    assert sizer.choose(cm, values, trees_only=True) == 48


def test_prices_inherited_from_another_batch_size_reach_only_the_next_size_up():
    """A 48-node tree that costs 3 AR steps at a small batch costs dozens at a large one; a key of another batch size
    inherits the relative costs as a prior, but chooses only up to the next size above what it measured itself. A key
    of the same batch size (a new context bucket) trusts the inherited prices."""
    sizer = DynamicSizer(DynamicConfig(sizes=(1, 2, 3, 4, 8, 48)))
    base = DriftCostModel(alpha=0.3, lam=0.05)
    for clock, (size, t) in enumerate([(1, 0.010), (2, 0.012), (2, 0.012), (3, 0.013), (3, 0.013), (4, 0.014),
                                       (4, 0.014), (8, 0.018), (8, 0.018), (48, 0.030), (48, 0.030)], start=1):
        base.observe(size, t, now=clock)
    values = [0.2] * 47  # l(48) = 10.4: at batch 1 the 48-node tree wins
    assert sizer.choose(base, values) == 48
    for foreign, want in ((True, {1, 2, 3}), (False, {48})):
        cost = DriftCostModel(alpha=0.3, lam=0.05).seeded_from(base)
        cost.foreign = foreign
        cost.observe(1, 0.040, now=20)
        cost.observe(2, 0.064, now=21)  # a 2-node tree costs 1.6 AR steps at this batch size
        assert sizer.choose(cost, values) in want


def test_a_stalled_first_step_does_not_price_a_size_for_the_rest_of_the_run():
    """A size's first step cannot be clipped, so the second keeps the faster of the two (interference only slows steps).
    benchmarks/sizer_trace.py at c35ee64: the 8-node tree's one exploration step took 69 ms against 47 ms for a
    1-node step, and the sizer ran 2-node trees for the rest of the run. Here 8 nodes truly cost 1.15 AR steps."""
    cm = DriftCostModel(alpha=0.3, lam=0.05)
    for clock, (size, t) in enumerate([(1, 0.047), (1, 0.047), (8, 0.069), (8, 0.054)], start=1):
        cm.observe(size, t, now=clock)
    assert cm.estimate(8) == pytest.approx(0.054, rel=0.01)
    cm.observe(8, 0.080, now=5)  # a later step that stalls is averaged in, clipped, as before
    assert 0.054 < cm.estimate(8) < 0.070

    seen = {8: 0}

    def time_of(nodes):
        if nodes == 8:
            seen[8] += 1
            if seen[8] == 1:
                return 0.069
        return {1: 0.047, 2: 0.050, 4: 0.052, 8: 0.054}.get(nodes, 0.047 + 0.002 * nodes)

    sizes = dict(sizes=(1, 2, 4, 8, 16, 64), explore=(1, 2, 4, 8, 16, 64))
    # one measurement per size, the first 8-node step's stall stands; with two, the 8-node tree is chosen
    assert 8 not in _drive(None, time_of=time_of, explore_repeat=1, **sizes).history[-100:]
    seen[8] = 0
    assert set(_drive(None, time_of=time_of, **sizes).history[-100:]) == {8}


def test_a_stalled_first_one_node_step_does_not_make_every_tree_look_cheap():
    """The 1-node speed's first measurement is as unclippable as a tree size's: seen on a shared AVX2 machine, a first
    1-node step at 2x (15.5 ms against 7.5) priced 2-node trees (11 ms) below it, and the sizer ran them for the rest
    of the run at 1.5x a 1-node step's time for 1.2 tokens. Exploring size 1 twice keeps the faster."""
    cm = DriftCostModel(alpha=0.3, lam=0.05)
    for clock, (size, t) in enumerate([(1, 0.0155), (1, 0.0075), (2, 0.011), (2, 0.011)], start=1):
        cm.observe(size, t, now=clock)
    assert cm.estimate(1) == pytest.approx(0.0075, rel=0.01)
    assert cm.estimate(2) == pytest.approx(0.011, rel=0.01)

    seen = {1: 0}

    def time_of(nodes):
        seen[1] += nodes == 1
        return 0.0155 if nodes == 1 and seen[1] == 1 else {1: 0.0075, 2: 0.011}.get(nodes, 0.0075 + 0.002 * nodes)

    # heads right 20% of the time: a 2-node tree accepts 1.2 tokens, not worth 1.47 AR steps
    sizer = _drive(None, time_of=time_of, sizes=(1, 2, 4, 8), explore=(1, 2, 4, 8), heads_right=0.2)
    assert sizer.history[:2] == [1, 1] and set(sizer.history[-100:]) == {1}


def test_dynamic_sizer_probes_while_at_one_node_and_reuses_costs_for_a_new_batch_size():
    sizer = _drive(cost_per_node=0.050, steps=600, probe_every=32)
    tail = sizer.history[4:]
    probes = [i for i, s in enumerate(tail) if s != 1]
    assert probes and all(tail[i] == 4 for i in probes)  # the cheapest tree: the candidate nearest probe_size=2
    # each probe confirms that no tree pays, so the gap doubles: 32 (the first), 64, 128, 256 (probe_max)
    assert [b - a for a, b in zip(probes, probes[1:])] == [64, 128, 256]
    capped = _drive(cost_per_node=0.050, steps=300, probe_every=32, probe_max=64).history[4:]
    probes = [i for i, s in enumerate(capped) if s != 1]
    assert [b - a for a, b in zip(probes, probes[1:])] == [64] * 4
    fast = _drive(cost_per_node=0.00001, steps=200, probe_every=32).history
    # after exploring 1 and 16 twice each: 1-node probes, no backoff
    assert [i for i, s in enumerate(fast) if s != 64] == [0, 1, 2, 3] + list(range(31, 200, 32))
    # back at a key whose 1-node time is older than `refresh` steps: one fresh 1-node step before choosing
    back = _drive(cost_per_node=0.00001, steps=130, batch=lambda step: 1 if step < 50 or step >= 100 else 2).history
    assert back[100:103] == [1, 64, 64] and back[50] == 1
    # batch size changes at step 100: the new key starts from the old measurements instead of exploring again
    moved = _drive(cost_per_node=0.050, steps=140, batch=lambda step: 1 if step < 100 else 2)
    assert set(moved.history[100:]) == {1} and len(moved.costs) == 2
    assert moved.costs[(2, 0)].n[1] > 0 and moved.costs[(2, 0)].n.get(16) == 0  # 16 is a prior, never re-run
    # trees are nearly free at batch 1 but expensive at batch 8 (compute-bound): the new key must not trust the
    # batch-1 prior; one fresh 1-node step rescales it, and only a few tree steps are spent finding out
    flip = _drive(lambda step: 0.00001 if step < 100 else 0.4, steps=140, batch=lambda step: 1 if step < 100 else 8)
    assert set(flip.history[90:100]) == {64} and flip.history[100] == 1
    # (4 was never measured at batch 1, so its first choice runs it twice: see the next test)
    assert sum(1 for s in flip.history[100:] if s != 1) <= 3 and set(flip.history[-30:]) == {1}


def test_a_size_first_chosen_from_the_line_gets_two_steps_before_a_stall_prices_it_out():
    """A size outside ``explore`` is first run when the regression line's price makes it the best; its first step may
    stall (seen with 3-node EAGLE trees at 1.5x their usual time: the sizer then ran 2-node trees for 130 steps). It
    runs ``explore_repeat`` steps before the next choice, and the faster of the two prices it."""
    seen = {3: 0}

    def time_of(nodes):
        seen[3] += nodes == 3
        return 0.030 if nodes == 3 and seen[3] == 1 else {1: 0.010, 2: 0.0115, 3: 0.012, 4: 0.018}[nodes]

    sizer = _drive(None, time_of=time_of, sizes=(1, 2, 3, 4), explore=(1, 2, 4), steps=80)
    first = sizer.history.index(3)
    assert sizer.history[first:first + 2] == [3, 3] and set(sizer.history[-40:]) == {3}


def test_dynamic_sizer_runs_no_heads_on_one_node_steps():
    """While the sizer chooses 1-node steps the proposer (Medusa's heads) is not run: it drafts at tree steps only.
    Exploration is kept to 1 and 2 nodes so that it ends within the first call whatever the step times."""
    dec = Decoder(MODEL, preset="propd-dynamic-only", sizer=("propd-dynamic", {"explore": (1, 2)}))
    sizer = next(obj for role, obj in dec.components if role == "sizer")
    proposer = next(obj for role, obj in dec.components if role == "proposer")
    calls = []
    topk = proposer.topk
    proposer.topk = lambda hidden, k: calls.append(hidden.shape) or topk(hidden, k)
    prompts = prompts_from(11, [5])
    first = dec.generate_ids(prompts, max_new_tokens=8)  # explores 1 and 2 nodes
    assert len(calls) == sum(1 for s in first.stats if s.tree_nodes > 1) > 0
    for cost in sizer.costs.values():  # then make the sizer believe trees never pay
        cost.estimate = lambda size: 1.0 * size
    sizer.since = sizer.cfg.refresh
    calls.clear()
    res = dec.generate_ids(prompts, max_new_tokens=12)
    one_node = sum(1 for s in res.stats if s.tree_nodes == 1)
    assert res.token_ids == ar(prompts, 12) and one_node > 0
    assert len(calls) == sum(1 for s in res.stats if s.tree_nodes > 1)


def test_dynamic_sizer_learns_acceptance_online():
    dec = Decoder(MODEL, preset="propd-dynamic-only")
    sizer = next(obj for role, obj in dec.components if role == "sizer")
    before = [row[:] for row in sizer.P]
    prompts = prompts_from(9, [4, 6])
    assert dec.generate_ids(prompts, max_new_tokens=30).token_ids == ar(prompts, 30)
    assert sizer.P != before and all(0.0 <= p <= 1.0 for row in sizer.P for p in row)
    assert all(row == sorted(row) for row in sizer.P)  # cumulative top-k estimates stay monotone in k


def test_acceptance_estimates_stay_monotone_whatever_trees_ran(monkeypatch):
    """Ranks are observed only at nodes with that many children, so each rank's EMA averages different nodes and the
    curves could cross (they did for 16 of 40 random size sequences before the projection); whatever sizes run,
    P[d] stays a cumulative top-k curve."""
    import random

    for seed in range(4):
        rnd = random.Random(seed)
        monkeypatch.setattr(DynamicSizer, "choose",
                            lambda self, cost, values, trees_only=False: rnd.choice([2, 4, 8, 16]))
        dec = Decoder(MODEL, preset="propd-dynamic-only")
        sizer = next(obj for role, obj in dec.components if role == "sizer")
        prompts = prompts_from(9, [4, 6])
        assert dec.generate_ids(prompts, max_new_tokens=30).token_ids == ar(prompts, 30)
        assert all(row == sorted(row) for row in sizer.P), seed


def test_unseen_depths_inherit_the_deepest_observed_curve():
    """With ``unseen="inherit"`` (the EAGLE presets) a depth no step has observed is estimated from the one above it,
    so trees grow deep enough to observe it; under the falling neutral prior (Medusa's default) an 8-node tree from a
    good first depth stays two levels deep, and deeper guesses would never be seen."""
    observed = [0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.91, 0.92, 0.93, 0.94]
    depth = {}
    for unseen in ("prior", "inherit"):
        sizer = DynamicSizer(DynamicConfig(max_depth=4, unseen=unseen))
        sizer.propd_setup(MODEL)
        prior = [row[:] for row in sizer.P]
        sizer.P[0], sizer.seen[0] = observed[:], True
        curves = sizer.curves()
        assert curves[0] == observed and sizer.P[1:] == prior[1:]
        assert curves[1:] == ([observed] * 3 if unseen == "inherit" else prior[1:])
        depth[unseen] = max(len(path) for path in best_tree(rank_probabilities(curves), 8)[0])
    assert depth["prior"] <= 2 < depth["inherit"]
    dec = Decoder(MODEL, preset="propd-dynamic-only", sizer=("propd-dynamic", {"unseen": "inherit"}))
    sizer = next(obj for role, obj in dec.components if role == "sizer")
    prompts = prompts_from(9, [4, 6])
    assert dec.generate_ids(prompts, max_new_tokens=30).token_ids == ar(prompts, 30)
    assert sizer.seen[0] and all(row == sorted(row) for row in sizer.P)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_monotone_lifts_a_curve_to_its_running_maximum(curve):
    fit = monotone(curve)
    assert len(fit) == len(curve) and fit == sorted(fit) and fit[0] == curve[0]
    assert all(f >= c for f, c in zip(fit, curve)) and all(f in curve[: i + 1] for i, f in enumerate(fit))
    assert monotone(sorted(curve)) == sorted(curve) and monotone(fit) == fit


def test_medusa_heuristic_builds_the_requested_tree_from_a_report(tmp_path):
    import json

    report = tmp_path / "report.json"
    curves = [[0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9], [0.3, 0.4, 0.5, 0.55, 0.6, 0.62, 0.64, 0.66,
                                                                        0.68, 0.7]] * 2
    report.write_text(json.dumps({"medusa_heads": [{"head": i, "topk_curve": c} for i, c in enumerate(curves)]}))
    dec = Decoder(MODEL, preset="medusa", sizer=("medusa-heuristic", {"size": 12, "accuracies": str(report)}))
    sizer = next(obj for role, obj in dec.components if role == "sizer")
    assert len(sizer.paths) == 11 and sizer.paths[0] == (0,)
    prompts = prompts_from(3, [5, 2])
    res = dec.generate_ids(prompts, max_new_tokens=16)
    assert res.token_ids == ar(prompts, 16) and all(s.tree_nodes == 12 for s in res.stats)
    with pytest.raises(PropdError, match="top-k accuracies"):
        Decoder(MODEL, preset="medusa", sizer=("medusa-heuristic", {"size": 12}))  # no report beside random heads


@pytest.mark.parametrize("preset", ["medusa", "propd"])
def test_presets_with_a_draft_vocabulary_are_lossless_and_guess_only_from_it(preset):
    model = tiny_loaded(seed=4, heads=4, early=(1, 2))
    refs = ar(prompts_from(9, [3, 8, 5]), 24)
    ids = torch.tensor([t for r in refs for t in r[::2]]).unique()  # half of the right tokens can be guessed
    model.heads.set_draft_vocab(ids)
    seen = []

    class Spy:
        @hookimpl
        def propd_after_step(self, ctx, tree, acceptance, stats, tokens):
            seen.append(tokens[:, 1:].flatten())

    pruners = [("early-topk", {"layer": 2, "k": 8})] if preset == "propd" else None
    for n in (None, 5):  # all of it, and its 5 most frequent tokens (here: the first 5 ids given)
        seen.clear()
        dec = Decoder(model, preset=preset, pruners=pruners, draft_vocab=n)
        dec.pm.register(Spy())
        res = dec.generate_ids(prompts_from(9, [3, 8, 5]), max_new_tokens=24)
        assert res.token_ids == refs
        guesses = torch.cat(seen)
        assert guesses.numel() > 0 and torch.isin(guesses, ids[:n]).all()
    with pytest.raises(PropdError, match="lists"):
        Decoder(model, preset=preset, draft_vocab=ids.numel() + 1)
    with pytest.raises(PropdError, match="none are loaded"):
        Decoder(tiny_loaded(seed=4), preset="ar", draft_vocab=5)


def test_static_sizer_builds_its_tree_once_per_device():
    from types import SimpleNamespace

    from propd.strategies.static import StaticConfig, StaticSizer

    sizer = StaticSizer(StaticConfig(tree="chain:3"))
    ctx = SimpleNamespace(device=torch.device("cpu", 0))  # its tensors report "cpu", as "cuda" ones report "cuda:0"
    first = sizer.propd_tree(ctx=ctx)
    assert sizer.propd_tree(ctx=ctx) is first and first.num_nodes == 4


def test_static_sizer_caps_the_rows_of_a_batch():
    """``max_rows``: B rows x nodes stays within the cap; budget trees keep their depth where they can, other trees
    are cut breadth-first (still trees, every kept node's parent kept)."""
    from types import SimpleNamespace

    from propd.strategies.static import StaticConfig, StaticSizer

    def tree(spec, cap, b):
        sizer = StaticSizer(StaticConfig(tree=spec, max_rows=cap))
        return sizer.propd_tree(ctx=SimpleNamespace(device=torch.device("cpu"), batch_size=b))

    assert [tree("budget:13:2", 64, b).num_nodes for b in (1, 4, 8, 16, 64, 100)] == [13, 13, 8, 4, 1, 1]
    assert tree("budget:13:2", 64, 16).max_depth == 2 and tree("budget:13:2", 64, 32).max_depth == 1
    assert tree("chain:10", 16, 4).paths == ((0,), (0, 0), (0, 0, 0))
    cut = tree("mc_sim_7b_63", 64, 4)
    assert cut.num_nodes == 16 and all(p[:-1] in set(cut.paths) | {()} for p in cut.paths)
    assert tree("mc_sim_7b_63", 0, 16).num_nodes == 64  # no cap


def test_static_sizer_row_cap_is_lossless():
    """5 rows under a cap of 10 token rows verify 2 nodes each; 2 rows (or 1 as the last row finishes) the whole
    5-node chain; the output is ar's either way."""
    prompts = prompts_from(11, [3, 9, 5, 14, 2])
    refs = ar(prompts, 20)
    dec = Decoder(MODEL, preset="medusa", sizer=("static", {"tree": "chain:4", "max_rows": 10}))
    wide = dec.generate_ids(prompts, max_new_tokens=20)
    assert wide.token_ids == refs and wide.stats[0].tree_nodes == 2
    pairs = dec.generate_ids(prompts, max_new_tokens=20, batch_size=2)
    assert pairs.token_ids == refs and {s.tree_nodes for s in pairs.stats} == {5}


def test_one_unlucky_tree_step_does_not_stop_exploration():
    """The calibration c of l(i) starts at 1 and moves with the tree steps: a first tree step that accepts nothing
    must not make every tree look worthless (c = 0 stopped exploration after the 2-node tree on the default model)."""
    sizer = DynamicSizer(DynamicConfig(sizes=(1, 2, 4, 8), explore=(1, 2, 4, 8)))
    sizer.propd_setup(MODEL)
    cost = CostModel(alpha=0.3, lam=0.05)
    cost.observe(1, 0.040, now=1)
    cost.observe(1, 0.040, now=2)
    cost.observe(2, 0.044, now=3)  # a 2-node tree, 10% dearer than a 1-node step ...
    assert sizer._exploring(cost, best_tree(rank_probabilities(sizer.P), 8)[1]) == 2  # (each size twice)
    cost.observe(2, 0.044, now=4)
    sizer.calibrate(measured=0.0, predicted=0.6)  # ... that accepted nothing
    assert 0.9 < sizer.calibration < 1.0
    values = best_tree(rank_probabilities(sizer.P), 8)[1]
    assert sizer._exploring(cost, values) == 4  # the 4-node tree is still measured
    for _ in range(200):  # heads that deliver a third of what the estimates promise
        sizer.calibrate(measured=0.2, predicted=0.6)
    assert sizer.calibration == pytest.approx(1 / 3, rel=0.01)


def test_calibration_fades_back_to_its_prior_while_no_tree_runs():
    """With ``calib_lam``, a calibration learned from poor drafts fades towards c = 1 as the sizer's clock runs on
    without tree steps, so that trees are chosen again; without it (ProPD's EMA) it stays, and the sizer keeps
    1-node steps for good after one stretch of poor drafts."""
    def after(calib_lam: float, idle_steps: int) -> tuple[float, int]:
        sizer = DynamicSizer(DynamicConfig(sizes=(1, 2, 4), explore=(1, 2, 4), calib_lam=calib_lam))
        sizer.propd_setup(MODEL)
        values = best_tree(rank_probabilities(sizer.P), 4)[1]
        cost = CostModel(alpha=0.3, lam=0.0)
        for clock, (size, t) in enumerate([(1, 0.040), (2, 0.044), (4, 0.046)]):
            cost.observe(size, t, now=clock + 1)
        for _ in range(200):  # a stretch of drafts that deliver a fifth of what the estimates promise
            sizer.calibrate(measured=0.1 * sum(values[:3]), predicted=0.5 * sum(values[:3]))
        sizer.clock += idle_steps  # 1-node steps: no evidence
        return sizer.calibration, sizer.choose(cost, values)

    assert after(0.0, 0) == (pytest.approx(0.2, rel=0.01), 1)
    assert after(0.0, 1000) == (pytest.approx(0.2, rel=0.01), 1)
    faded, size = after(0.01, 0)
    assert faded == pytest.approx(0.2, rel=0.01) and size == 1
    halfway, _ = after(0.01, 70)
    assert 0.3 < halfway < 0.9
    faded, size = after(0.01, 1000)
    assert faded == pytest.approx(1.0, abs=0.01) and size > 1


def test_pruned_trees_do_not_mark_whole_trees_down():
    """Pruning costs a tree some accepted guesses. The calibration of the sizes a pruner cuts is kept apart from that of
    whole trees: with one shared ratio the pruned 64-node tree's losses made every small tree look worthless."""
    def sized(pruned_losses_shared: bool) -> int:
        sizer = DynamicSizer(DynamicConfig(sizes=(1, 2, 4, 8, 16, 64)))
        sizer.propd_setup(MODEL)
        values = best_tree(rank_probabilities(sizer.P), 64)[1]
        cost = DriftCostModel(alpha=0.3, lam=0.05)
        for clock, (size, t) in enumerate([(1, 0.030), (2, 0.032), (4, 0.034), (8, 0.037), (16, 0.060), (64, 0.1)]):
            cost.observe(size, t, now=clock + 1)
        if not pruned_losses_shared:
            sizer.pruned.update({16, 64})
        for _ in range(200):  # pruned trees keep 1 of every 5 guesses the estimates promise
            sizer.calibrate(measured=0.2 * sum(values[:63]), predicted=sum(values[:63]),
                            pruned=not pruned_losses_shared)
        return sizer, sizer.choose(cost, values)

    apart, choice = sized(pruned_losses_shared=False)
    assert apart.calibration == 1.0 and apart.calibration_for(pruned=True) == pytest.approx(0.2, rel=0.01)
    assert choice in (2, 4, 8)
    shared, choice = sized(pruned_losses_shared=True)
    assert shared.calibration == pytest.approx(0.2, rel=0.01) and choice == 1
