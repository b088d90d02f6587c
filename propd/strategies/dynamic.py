"""TreeSizer ``propd-dynamic`` (ProPD, Zhong et al. 2024, sec. 4.2): ``medusa-heuristic``'s construction
(:mod:`propd.strategies.heuristic`) from *online* estimates, with the
size chosen to maximize expected accepted tokens per second:

* acceptance: for depth i and rank k, ``P_i^k <- (1 - alpha) P_i^k + alpha * 1(true token in TopK_i)``, updated
  from each verified token, where TopK_i is the proposer's k first children of the accepted node at depth i (the
  paper's head i top-k for Medusa; any proposer's draft for others, see ``DynamicSizer.learn``);
  ``p_i^k = P_i^k - P_i^{k-1}``; the best tree of size i holds the i most valuable nodes
  and its expected accepted length is ``l(i) = 1 + c * sum of their values``, where c (1 in the paper) is the
  measured / predicted accepted guesses of recent tree steps (see ``DynamicSizer.calibration``);
* cost: ``T_perf^i <- (1 - alpha) T_perf^i + alpha * t_i`` for every size tried, and a weighted least-squares line
  ``T_est(i) = beta0 + beta1 * i`` with weights ``W_i = exp(-lambda * o_i)``, o_i the steps since size i was last
  measured (closed form);
* the size in S maximizing ``l(i) / T_est(i)`` is chosen, again whenever the live batch size or the context-length
  bucket changes and every ``refresh`` steps; the 1-node tree (a plain AR step) is always a candidate.

Exploration is kept cheap, since on a small model every step spent on a bad size is lost time: the first (batch
size, bucket) measures only ``explore`` sizes (two steps per size, the 1-node one too, ``explore_repeat``) before
trusting the line; a new key starts from the previous key's measurements as a prior instead of exploring again: it
measures one 1-node step, rescales the prior by the ratio of that step's time to the prior's, weights the prior at
most ``CostModel.PRIOR_WEIGHT`` in the line, and replaces each size's prior with its first fresh measurement. While
the choice is the 1-node tree the heads are not run at all (their cost would otherwise be hidden outside T(1));
every ``probe_every`` steps one step of the other regime (a ``probe_size`` tree while at 1 node, by default the
cheapest tree; a 1-node step while at a tree) keeps both estimates fresh, and the choice is made again right after
it. While probes keep confirming the 1-node choice, the gap between them doubles (up to ``probe_max`` steps): where
no tree pays, as for a small model at batch >= 2 on a CPU, every probe is a loss. Estimates age: a size's old time
counts ``(1 - time_alpha) * exp(-lambda * age)`` against a new measurement (the paper's regression weight applied to
T_perf^i itself), with age in steps of the whole sizer, since the machine's speed drifts while other keys run; and
on returning to a key whose 1-node time is older than ``refresh`` steps, one 1-node step is measured before
choosing. The line is fitted over tree sizes >= 2 only, and it prices only sizes not yet measured at this key: a
measured size's own time T_perf^i stands for it, since on CPUs step time is far from linear in the tree size (see
``CostModel.estimate``).

Step times are the decoder's wall-clock times of whole steps, pruning included, so the two ProPD techniques compose.

The cost model above is the paper's (``cost="paper"``, ``CostModel``). By default (``cost="drift"``,
``DriftCostModel``) each step time is split into the machine's current speed, shared by all sizes, and the size's
cost relative to a 1-node step, so that a size measured in a slow (or fast) moment is priced at the speed of now; the
paper's weighted line prices the unmeasured sizes from the relative costs. On a shared CPU the speed drifts by more
than the differences between small trees, and the paper's T_perf^i kept such stale times (see ``DriftCostModel``).
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.strategies.costs import CostModel, DriftCostModel, weighted_line  # noqa: F401 (re-exported)
from propd.tree import BestTrees, TreeCache, rank_probabilities


@attrs.frozen
class DynamicConfig:
    sizes: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # S, nodes including the root
    alpha: float = 0.05  # EMA rate of the acceptance estimates
    time_alpha: float = 0.3  # EMA rate of the per-size step times (steps are few per size)
    lam: float = 0.05  # lambda: weight decay of old step-time measurements, per step of age
    refresh: int = 16  # re-choose at least this often (steps)
    context_bucket: int = 256  # re-choose when the longest context crosses a multiple of this
    max_rank: int = 10
    max_depth: int | None = None  # deepest tree; default: as many as the Medusa heads, or DEFAULT_DEPTH without
    explore: tuple[int, ...] = (1, 2, 4, 8, 16, 64)  # sizes measured before the first choice ...
    explore_repeat: int = 2  # ... each size this many times (DriftCostModel keeps the faster of its first two)
    probe_every: int = 32  # one step of the other regime (1 node vs a tree) this often ...
    probe_max: int = 256  # ... and, while probes keep confirming 1-node steps, up to this often (doubling)
    probe_size: int = 2  # the probe tree while at 1 node: the candidate nearest this, above 1; 0: the best tree
    # "drift": step time = speed x relative cost of the size (DriftCostModel); "paper": the EMA T_perf^i (CostModel)
    cost: str = attrs.field(default="drift", validator=attrs.validators.in_(("drift", "paper")))
    # a depth no step has observed yet: "prior", the neutral prior, which falls with depth (Medusa heads, each weaker
    # than the one before); "inherit", the deepest observed depth's curve, also as the start of its EMA (a feature
    # drafter, whose later guesses read its earlier ones, stays about as accurate: under the falling prior its trees
    # stay too shallow for the deeper depths ever to be observed)
    unseen: str = attrs.field(default="prior", validator=attrs.validators.in_(("prior", "inherit")))
    # per step of the sizer's clock, the rate at which the calibration's evidence fades back to its prior (c = 1): a
    # calibration learned in a stretch of poor drafts otherwise stays with the sizer while it runs 1-node steps, which
    # bring no evidence, and only rare probes could lift it (0: it never fades, ProPD's EMA)
    calib_lam: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))



class DynamicSizer:
    def __init__(self, config: DynamicConfig):
        if not config.sizes or min(config.sizes) < 1:
            raise PropdError("propd-dynamic needs candidate sizes >= 1")
        self.cfg = config
        self.sizes = sorted(set(config.sizes) | {1})
        self.explore = [s for s in sorted(set(config.explore)) if s in self.sizes] or [1]
        larger = [s for s in self.sizes if s > 1]
        self.probe = min(larger, key=lambda s: abs(s - config.probe_size)) if larger else 1
        self.P: list[list[float]] = []  # P[i][k]: EMA of P(true token within the top k+1 children at depth i)
        self.seen: list[bool] = []  # whether depth i has been observed
        self.costs: dict[tuple[int, int], CostModel] = {}
        self.key: tuple[int, int] | None = None
        self.size = 1
        self.since = 0
        self.idle = 0  # steps since the last probe
        self.gap = config.probe_every  # steps between probes (doubles while probes confirm 1-node steps)
        self.probed = False  # the last step was a probe: choose again with what it measured
        self.clock = 0  # steps decoded by this sizer, over all keys
        self.cache = TreeCache()
        self.history: list[int] = []  # tree size used at each step (for analysis)
        self._best: BestTrees | None = None  # the best-tree search of the current acceptance estimates
        # EMAs of measured and predicted accepted guesses per tree step, starting from a prior of c = 1: one pair for
        # whole trees and one for the sizes a pruner cuts (``pruned``), whose acceptance also pays for the pruning
        self._gain = {False: [self.CALIBRATION_PRIOR] * 2, True: [self.CALIBRATION_PRIOR] * 2}
        self._gain_clock = {False: 0, True: 0}  # the clock of each pair's last update (``calib_lam``)
        self.pruned: set[int] = set()  # tree sizes whose steps a pruner has cut

    # The calibration's EMAs start at this many accepted guesses each (c = 1, the paper's l(i)), so that the first
    # few tree steps move c gradually: without it, a first tree step that accepted nothing set c to 0, every tree
    # looked worthless (l(i) = 1), exploration stopped and only rare probes could revive it.
    CALIBRATION_PRIOR = 0.5

    @property
    def calibration(self) -> float:
        """Measured / predicted accepted guesses on whole-tree steps (1 until measured). The product-of-ranks model
        assumes every head's guesses fit every path, but head i's guesses follow the most likely continuation, so
        it over-promises for large trees of weak heads; scaling l(i) - 1 by this ratio keeps choices honest."""
        return self.calibration_for(pruned=False)

    def calibration_for(self, pruned: bool) -> float:
        """The calibration of whole trees, or (``pruned``) of the sizes a pruner cuts. Kept apart because a pruned
        tree accepts less than its whole self: in the ``propd`` preset only trees of 16+ nodes are pruned, and one
        shared ratio let the pruned trees' losses mark the unpruned small trees down too (docs/lab)."""
        measured, predicted = self._faded(pruned)
        return measured / predicted if predicted > 0 else 1.0

    def _faded(self, pruned: bool) -> list[float]:
        """The calibration's two EMAs, each moved back towards the prior by exp(-calib_lam * steps since the last
        tree step that updated them)."""
        g = self._gain[pruned]
        if not self.cfg.calib_lam:
            return g
        keep = math.exp(-self.cfg.calib_lam * (self.clock - self._gain_clock[pruned]))
        prior = self.CALIBRATION_PRIOR
        return [prior + keep * (v - prior) for v in g]

    def calibrate(self, measured: float, predicted: float, pruned: bool = False) -> None:
        """One tree step's accepted guesses (mean over rows) and what the estimates predicted for its whole tree."""
        a, g = self.cfg.alpha, self._faded(pruned)
        self._gain[pruned] = [(1 - a) * g[0] + a * measured, (1 - a) * g[1] + a * predicted]
        self._gain_clock[pruned] = self.clock

    def _l(self, size: int, values: Sequence[float]) -> float:
        """l(size): 1 + the calibrated sum of the best ``size``-node tree's node values (``values``: in the order the
        search found them, a list or a ``BestTrees.values``, read as ``[:n]``)."""
        return 1.0 + self.calibration_for(size in self.pruned) * sum(values[: size - 1])

    @hookimpl
    def propd_setup(self, model):
        K = self.cfg.max_depth or (model.heads.num_heads if model.heads is not None else self.DEFAULT_DEPTH)
        R = self.cfg.max_rank
        # a neutral prior (no pre-characterization): rank r at depth i right with a chance that falls with both
        self.P = [[min(1.0, 0.5 / (i + 1) * (1 + k) / (1 + k + 1)) for k in range(R)] for i in range(K)]
        self.seen = [False] * K

    def curves(self) -> list[list[float]]:
        """The acceptance curves trees are built from: ``P``, with each unobserved depth below the first taken from
        the depth above it when ``unseen`` is ``"inherit"``."""
        out = []
        for d, curve in enumerate(self.P):
            inherit = self.cfg.unseen == "inherit" and d > 0 and not self.seen[d]
            out.append(list(out[-1]) if inherit else curve)
        return out

    DEFAULT_DEPTH = 6  # tree depth without Medusa heads to bound it (max_depth sets it)

    def _exploring(self, cost: CostModel | DriftCostModel, values: Sequence[float], entering: bool = False
                   ) -> int | None:
        """The next size to measure before the first choice at this key, or None.

        On ``entering`` a key seen before whose 1-node time is older than ``refresh`` steps, one 1-node step is
        measured first: the machine's speed drifts, and fresh tree times against a stale 1-node time pick trees that
        do not pay.

        Sizes are explored smallest first, each ``explore_repeat`` times in a row (one stalled step must not price a
        size for the rest of the run, see ``DriftCostModel``), and exploration stops early once a measured tree step
        takes at least l(largest) times a 1-node step: then no tree that large or larger can pay, even with every
        guess of the largest tree counted, and measuring one (a 64-node tree is 256 rows at batch 4) costs many AR
        steps. Before its last exploration step a size must take twice that to stop exploration."""
        if len(self.costs) > 1 or cost.seeded:  # a later key: it has a prior, rescaled by one fresh 1-node step
            fresh_prior = cost.seeded and cost.n.get(1, 0) == 0
            return 1 if fresh_prior or (entering and cost.age(1, self.clock) > self.cfg.refresh) else None
        repeat = max(1, self.cfg.explore_repeat)
        untried = [s for s in self.explore if cost.n.get(s, 0) < repeat]
        if untried and cost.n.get(1, 0) > 0:
            # a size measured fewer than ``repeat`` times is hopeless only at twice the bar: its step may have stalled
            most = self._l(max(self.sizes), values)
            hopeless = [s for s, t in cost.t.items() if s > 1 and cost.n.get(s, 0) > 0
                        and t >= most * cost.t[1] * (1 if cost.n[s] >= repeat else 2)]
            if hopeless:
                untried = [s for s in untried if s < min(hopeless)]
        return untried[0] if untried else None

    def choose(self, cost: CostModel, values: Sequence[float], trees_only: bool = False) -> int:
        """The size maximizing l(i) / T_est(i); ``values`` are the node values of the largest best tree. The caller
        has checked that nothing is left to explore at this key. With ``trees_only``, the best size above 1.

        Candidates are the sizes up to the largest one priced by a measurement (here, or inherited from a key of the
        same batch size) and the next size above it: the weighted line interpolates between measured sizes well
        enough, but extrapolated far beyond them from a few noisy small sizes it can slope down and promise a large
        tree for less than a 1-node step. Prices inherited from another batch size count only up to the sizes
        measured here: a tree's cost relative to a 1-node step grows with the rows it adds (nodes x batch), so a
        large tree priced at a small batch looks far cheaper than it is at a large one. Larger trees are reached one
        size at a time, each measured as it is chosen."""
        fresh = [s for s, count in cost.n.items() if count > 0]
        top = max([1, *(fresh if cost.foreign else cost.n)])
        above = [s for s in self.sizes if s > top][:1]
        candidates = [s for s in self.sizes if s <= top] + above
        if trees_only:
            candidates = [s for s in candidates if s > 1] or candidates
        best, best_rate = 1, -1.0
        for s in candidates:
            rate = self._l(s, values) / cost.estimate(s)
            if rate > best_rate:
                best, best_rate = s, rate
        return best

    @hookimpl
    def propd_tree(self, ctx):
        key = (ctx.batch_size, max(ctx.host_lengths) // self.cfg.context_bucket)
        cost = self.costs.get(key)
        if cost is None:
            cost = (DriftCostModel if self.cfg.cost == "drift" else CostModel)(self.cfg.time_alpha, self.cfg.lam)
            if self.key in self.costs:
                cost.seeded_from(self.costs[self.key])
                cost.foreign = self.key[0] != key[0]  # inherited from another batch size (see ``choose``)
            self.costs[key] = cost
        # best-first search pops nodes in a fixed order, so the best tree of size s is the first s-1 paths of the
        # largest one: one search serves both the choice and the tree, run as far as the sizes priced need
        if self._best is None:  # searched again only after the acceptance estimates moved
            self._best = BestTrees(rank_probabilities(self.curves()))
        paths, values = self._best.paths, self._best.values
        if key != self.key or self.since >= self.cfg.refresh or self.probed:
            entering, was = key != self.key, self.size
            self.key, self.since = key, 0
            first = self._exploring(cost, values, entering)
            self.size = first if first is not None else self.choose(cost, values)
            if self.probed and first is None:  # back off while probes keep confirming that no tree pays
                confirmed = not entering and was == self.size == 1
                self.gap = min(2 * self.gap, self.cfg.probe_max) if confirmed else self.cfg.probe_every
            self.probed = False
            if first is None and self.size > 1 and self.size not in cost.n:
                # a size never measured, here or at the key a prior came from, chosen from the line's price: run it
                # ``explore_repeat`` steps before choosing again, as exploration does (one first step that stalled
                # would otherwise price it out for good: ``DriftCostModel``)
                self.since = self.cfg.refresh - max(1, self.cfg.explore_repeat)
            elif first is not None or cost.age(self.size, self.clock) > self.cfg.refresh:
                self.since = self.cfg.refresh - 1  # a first (or stale) measurement of this size: choose again next
        self.since += 1
        size = self.size
        self.idle += 1
        if self.idle >= self.gap:  # keep the other regime's estimates fresh
            if size > 1:
                size = 1
            else:
                size = self.probe if self.cfg.probe_size else self.choose(cost, values, trees_only=True)
            self.idle, self.probed = 0, True
        self.clock += 1
        self.history.append(size)
        return self.cache.get(paths[: size - 1], ctx.device)

    @hookimpl
    def propd_after_step(self, draft, acceptance, stats, tree):
        cost = self.costs.get(self.key)
        # a budget is priced by what choosing it costs: a step whose proposer drafted fewer nodes (a lookup without a
        # match) counts at the budget's size too
        if cost is not None:
            cost.observe(tree.num_nodes, stats.step_time_s, now=self.clock)
        if draft.num_nodes <= 1:
            return  # a plain AR step (or a draft that found nothing): no guesses to learn from
        if tree.num_nodes > 1 and self._best is not None:
            present = draft.num_nodes if draft.present is None else float(draft.present.sum(1).float().mean())
            if stats.nodes_after_pruning < present:
                self.pruned.add(tree.num_nodes)
            predicted = sum(self._best.values[: tree.num_nodes - 1])
            self.calibrate(sum(stats.accepted) / len(stats.accepted) - 1.0, predicted, tree.num_nodes in self.pruned)
        self.learn(draft, acceptance)
        self._best = None

    def learn(self, draft, acceptance) -> None:
        """Update P[d][k] from one verified draft, whatever proposed it: along each row's accepted path, the node at
        depth d has a known true successor (the next accepted token, or the bonus); if one of its children carries it,
        the true token was the proposer's choice of that sibling rank. Only ranks the node had children for are
        observed (rank k of a node with n <= k children says nothing), so P[d][k] moves for observed ranks only; since
        ranks are then averaged over different nodes, a depth's curve can cross itself, and it is projected back onto
        curves monotone in k (``monotone``)."""
        R, K = self.cfg.max_rank, len(self.P)
        rows, tokens = draft.rows, draft.tokens
        B, T = tokens.shape
        best, alen = acceptance.best, acceptance.accept_len
        path = rows.path_to(best)  # (B, D+1)
        D = min(path.shape[1], K)
        # true successor of the path node at depth d: the path token at d+1, or the bonus at d == accept_len
        true = torch.cat([tokens.gather(1, path[:, 1:]), acceptance.bonus[:, None]], dim=1)
        true = true.scatter(1, alen[:, None], acceptance.bonus[:, None])[:, :D]  # (B, D)
        known = torch.arange(D, device=tokens.device)[None, :] <= alen[:, None]  # (B, D)
        real = torch.ones_like(tokens, dtype=torch.bool) if draft.present is None else draft.present
        child = (rows.parents[:, None, :] == path[:, :D, None]) & real[:, None, :]  # (B, D, T)
        ranks = rows.sibling_ranks()[:, None, :].expand(B, D, T)
        n_child = child.sum(dim=2)  # (B, D)
        hit = child & (tokens[:, None, :] == true[..., None])
        hit_rank = torch.where(hit.any(dim=2), (ranks * hit).sum(dim=2), R)  # (B, D): R when missed
        k = torch.arange(R, device=tokens.device)
        observed = (known[..., None] & (k < n_child[..., None])).to(torch.float32)  # (B, D, R)
        within = (hit_rank[..., None] <= k).to(torch.float32)  # (B, D, R): 1(true token in top k+1)
        count = observed.sum(dim=0)  # (D, R)
        mean = (within * observed).sum(dim=0) / count.clamp(min=1)
        stats = torch.stack([count, mean]).tolist()  # one small transfer per step
        a = self.cfg.alpha
        start = None if all(self.seen) else self.curves()  # needed only while a depth is unobserved
        for d in range(D):
            if not self.seen[d] and any(stats[0][d]):
                self.P[d], self.seen[d] = list(start[d]), True  # the EMA starts from the curve trees were built from
            for r in range(R):
                c = stats[0][d][r]
                if c:
                    keep = (1 - a) ** c  # c EMA updates with the same observation
                    self.P[d][r] = keep * self.P[d][r] + (1 - keep) * stats[1][d][r]
            self.P[d] = monotone(self.P[d])


def monotone(curve: list[float]) -> list[float]:
    """``curve`` lifted to its running maximum, so that a cumulative top-k accuracy never falls as k grows. Lifting
    (rather than pooling) keeps the lower ranks' estimates, which rest on more observations: rank k is seen only at
    nodes with more than k children, and rank 0 at every node with one."""
    out, top = [], float("-inf")
    for v in curve:
        top = max(top, v)
        out.append(top)
    return out


@hookimpl
def propd_register_components(register):
    register("sizer", "propd-dynamic", DynamicSizer, DynamicConfig,
             "ProPD dynamic tree sizing: online acceptance EMA + weighted-regression step time, max l(i)/T(i)")
