"""TreeSizers ``medusa-heuristic`` and ``propd-dynamic``.

``medusa-heuristic`` (Medusa, Cai et al. 2023, sec. 3.3.1): from per-head top-k accuracies measured offline (the
``report.json`` that ``propd train-heads`` writes beside the heads, on held-out training prompts), grow a tree of a
fixed size greedily, always adding the node of highest expected acceptance.

``propd-dynamic`` (ProPD, Zhong et al. 2024, sec. 4.2): the same construction from *online* estimates, with the
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

Exploration is kept cheap, since on a small model every step spent on a bad size is lost time: the first
(batch size, bucket) measures only ``explore`` sizes (two steps per tree size, ``explore_repeat``) before trusting
the line; a new key starts
from the previous key's measurements as a prior instead of exploring again: it measures one 1-node step, rescales
the prior by the ratio of that step's time to the prior's, weights the prior at most ``CostModel.PRIOR_WEIGHT``
in the line, and replaces each size's prior with its first fresh measurement. While the choice is the 1-node tree
the heads are not run at all (their cost would otherwise be hidden outside T(1)); every ``probe_every`` steps one
step of the other regime (a ``probe_size`` tree while at 1 node, by default the cheapest tree; a 1-node step while at
a tree) keeps both estimates fresh, and the choice is made again right after it. While probes keep confirming the
1-node choice, the gap between them doubles (up to ``probe_max`` steps): where no tree pays, as for a small model at
batch >= 2 on a CPU, every probe is a loss. Estimates age: a size's old time counts ``(1 - time_alpha) *
exp(-lambda * age)`` against a new measurement (the paper's regression weight applied to T_perf^i itself), with age
in steps of the whole sizer, since the machine's speed drifts while other keys run; and on returning to a key whose
1-node time is older than ``refresh`` steps, one 1-node step is measured before choosing. The line is fitted over
tree sizes >= 2 only, and it prices only sizes not yet measured at this key: a measured size's own time T_perf^i
stands for it, since on CPUs step time is far from linear in the tree size (see ``CostModel.estimate``).

Step times are the decoder's wall-clock times of whole steps, pruning included, so the two ProPD techniques compose.

The cost model above is the paper's (``cost="paper"``, ``CostModel``). By default (``cost="drift"``,
``DriftCostModel``) each step time is split into the machine's current speed, shared by all sizes, and the size's
cost relative to a 1-node step, so that a size measured in a slow (or fast) moment is priced at the speed of now; the
paper's weighted line prices the unmeasured sizes from the relative costs. On a shared CPU the speed drifts by more
than the differences between small trees, and the paper's T_perf^i kept such stale times (see ``DriftCostModel``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.strategies.tree_builder import best_tree, rank_probabilities
from propd.tree import DraftTree


def _report_curves(model) -> list[list[float]] | None:
    path = getattr(model, "heads_path", None)
    if path is None:
        return None
    report = Path(path) / "report.json"
    if not report.is_file():
        return None
    heads = json.loads(report.read_text()).get("medusa_heads", [])
    curves = [h.get("topk_curve") for h in heads]
    return curves if curves and all(curves) else None


class _TreeCache:
    def __init__(self):
        self._trees: dict[tuple, DraftTree] = {}

    def get(self, paths: list[tuple[int, ...]], device) -> DraftTree:
        key = (tuple(paths), str(device))
        tree = self._trees.get(key)
        if tree is None:
            if len(self._trees) > 256:
                self._trees.clear()
            tree = self._trees[key] = DraftTree.from_paths(paths, device=device)
        return tree


# ------------------------------------------------------------------------------------------- medusa-heuristic


@attrs.frozen
class HeuristicConfig:
    size: int = attrs.field(default=64, validator=attrs.validators.ge(1))  # nodes, the root included
    accuracies: str | None = None  # a report.json; default: the one beside the loaded heads
    max_rank: int = 10


class MedusaHeuristicSizer:
    def __init__(self, config: HeuristicConfig):
        self.cfg = config
        self.paths: list[tuple[int, ...]] | None = None
        self.cache = _TreeCache()

    @hookimpl
    def propd_setup(self, model):
        if model.heads is None:
            raise PropdError("medusa-heuristic builds its tree for Medusa heads, but none are loaded: pass --heads")
        if self.cfg.accuracies:
            p = Path(self.cfg.accuracies)
            if not p.is_file():
                raise PropdError(f"accuracies report {p} does not exist")
            curves = [h["topk_curve"] for h in json.loads(p.read_text())["medusa_heads"]]
        else:
            curves = _report_curves(model)
        if not curves:
            raise PropdError("medusa-heuristic needs per-head top-k accuracies: the heads' report.json (written by "
                             "`propd train-heads`) or accuracies=PATH")
        probs = [row[: self.cfg.max_rank] for row in rank_probabilities(curves[: model.heads.num_heads])]
        self.paths, _ = best_tree(probs, self.cfg.size)

    @hookimpl
    def propd_tree(self, ctx):
        return self.cache.get(self.paths, ctx.device)


# ------------------------------------------------------------------------------------------- propd-dynamic


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
    explore_repeat: int = 2  # ... each tree size this many times (DriftCostModel keeps the faster of its first two)
    probe_every: int = 32  # one step of the other regime (1 node vs a tree) this often ...
    probe_max: int = 256  # ... and, while probes keep confirming 1-node steps, up to this often (doubling)
    probe_size: int = 2  # the probe tree while at 1 node: the candidate nearest this, above 1; 0: the best tree
    # "drift": step time = speed x relative cost of the size (DriftCostModel); "paper": the EMA T_perf^i (CostModel)
    cost: str = attrs.field(default="drift", validator=attrs.validators.in_(("drift", "paper")))


class _Measured:
    """What both cost models keep about their measurements: per size, how many were fresh at this key and when."""

    PRIOR_WEIGHT = 0.1  # a prior counts like a measurement this much older than the newest: exp(-lambda * age)

    def __init__(self, lam: float):
        self.lam = lam
        self.n: dict[int, int] = {}  # fresh measurements per size (0 for a prior inherited from another key)
        self.last: dict[int, int] = {}  # clock of the last measurement
        self.clock = 0

    def _tick(self, now: int | None) -> None:
        """Set the clock for a measurement: ``now`` is the sizer's step clock (shared by all keys, so that an
        estimate left behind while other keys ran counts as old); without it, this model's own clock ticks."""
        self.clock = self.clock + 1 if now is None else now

    def _count(self, size: int) -> None:
        """Count a fresh measurement of ``size`` at the current clock."""
        self.n[size] = self.n.get(size, 0) + 1
        self.last[size] = self.clock

    def _inherit(self, other: "_Measured") -> None:
        """Take ``other``'s sizes as priors: none counts as measured here, and each is dated at least
        ``log(1 / PRIOR_WEIGHT) / lambda`` steps back, so that its line weight is at most ``PRIOR_WEIGHT``."""
        self.clock = other.clock
        oldest = other.clock - math.ceil(math.log(1 / self.PRIOR_WEIGHT) / self.lam) if self.lam > 0 else other.clock
        self.last = {s: min(t, oldest) for s, t in other.last.items()}
        self.n = {s: 0 for s in other.n}

    @property
    def seeded(self) -> bool:
        return any(n == 0 for n in self.n.values())

    def age(self, size: int, now: int) -> float:
        """Steps since ``size`` was last measured at this key (infinite if never)."""
        return now - self.last[size] if self.n.get(size, 0) > 0 else math.inf


class CostModel(_Measured):
    """The paper's step-time model (ProPD sec. 4.2, ``cost="paper"``): an EMA T_perf^i per size and a weighted
    least-squares line through them."""

    def __init__(self, alpha: float, lam: float):
        super().__init__(lam)
        self.alpha = alpha
        self.t: dict[int, float] = {}  # T_perf^i

    def seeded_from(self, other: "CostModel") -> "CostModel":
        """A copy of ``other``'s estimates as a prior (another batch size or context bucket). Each size's first fresh
        measurement replaces its prior; the first fresh 1-node time also rescales the remaining priors by its ratio
        to the prior's (a bigger batch makes every step slower); and priors enter the line with weight
        ``PRIOR_WEIGHT`` at most."""
        self.t = dict(other.t)
        self._inherit(other)
        return self

    def observe(self, size: int, seconds: float, now: int | None = None) -> None:
        """Record one step of ``size`` nodes (``now``: see ``_tick``)."""
        self._tick(now)
        fresh = self.n.get(size, 0) == 0
        if fresh and size == 1 and self.t.get(1):
            ratio = seconds / self.t[1]
            for s in self.t:
                if self.n.get(s, 0) == 0 and s != 1:
                    self.t[s] *= ratio
        if fresh:
            self.t[size] = seconds
        else:  # the old estimate's weight decays with its age, like the line's weights W_i = exp(-lambda * o_i)
            keep = (1 - self.alpha) * math.exp(-self.lam * max(0, self.clock - self.last[size] - 1))
            self.t[size] = keep * self.t[size] + (1 - keep) * seconds
        self._count(size)

    def fit(self) -> tuple[float, float] | None:
        """(beta0, beta1) of the weighted fit over tree sizes >= 2, or None with fewer than two measured."""
        sizes = [s for s in self.t if s > 1]
        if len(sizes) < 2:
            return None
        xs = torch.tensor(sizes, dtype=torch.float64)
        ys = torch.tensor([self.t[s] for s in sizes], dtype=torch.float64)
        w = torch.tensor([math.exp(-self.lam * (self.clock - self.last[s])) for s in sizes], dtype=torch.float64)
        return weighted_line(xs, ys, w)

    def estimate(self, size: int) -> float:
        """T_est(size): the size's own measured time T_perf^i where it has one at this key, else the weighted line.

        Step time is not linear in the tree size on CPUs: the matrix kernels change with the row count, so a 1-node
        step (matrix-vector products), a 2- or 4-node tree and an 8-node tree sit on different curves (on the default
        model, 2 CPU cores, fp32: 65 ms at 1 node, 72 at 2, 89 at 3, 76 at 4, 101 at 6 and 111 at 8; `propd bench`
        with `medusa-heuristic:size=N` variants on held-out training prompts). A line through sizes 8 and 64 would
        price the 4-node tree like the 8-node one. So the line (the paper's regression) only prices sizes not yet
        measured here; its optimism for them is corrected by their first measurement. Priors inherited from another
        key are not measurements here: they enter the line, down-weighted, and never stand alone."""
        if self.n.get(size, 0) > 0 or (size == 1 and 1 in self.t):
            return self.t[size]
        fit = None if size == 1 else self.fit()
        if fit is None:
            return self.t.get(size, float("inf"))
        b0, b1 = fit
        floor = min(self.t.values()) * 0.5  # a line fitted through noise must not promise free steps
        return max(b0 + b1 * size, floor)


class DriftCostModel(_Measured):
    """Step time as machine speed x relative cost of the size, each tracked with its own uncertainty.

    The paper's T_perf^i (``CostModel``) assumes the machine's speed holds still, but on a shared CPU it drifts by more
    than the differences between tree sizes, and a size measured once in a slow moment stays overpriced (measured with
    ``benchmarks/sizer_trace.py``: docs/lab). So each step time is modelled as

        log t = u + r_i + noise,    u: log of the 1-node step time now (a random walk; r_1 = 0),
                                    r_i: log of size i's cost relative to a 1-node step (nearly constant),

    and a step of size i splits its innovation e = log t - u - r_i between u and r_i in proportion to their variances,
    as a Kalman filter (Kalman 1960) does, with the two kept independent (a diagonal covariance). The full filter's
    cross-covariance revises old relative costs whenever the speed changes ("the 1-node steps got faster, so the tree
    measured before must have been dearer"), which on a machine whose speed jumps is the wrong explanation. A slow
    moment then moves u, which every size shares, and leaves the relative costs alone, so a size measured minutes ago
    is priced at today's speed: T_est(i) = exp(u + r_i). The speed drifts ``q = R * alpha^2 / (1 - alpha)`` in
    variance per step (for which the steady-state gain of a speed measured every step is the EMA rate alpha,
    ``time_alpha``, of ``CostModel``); relative costs drift ``REL_DRIFT`` times as fast, so during a long run of one
    tree size most of a slowdown goes to the speed. An innovation is clipped at ``CLIP`` standard deviations:
    interference on a shared machine makes single steps several times slower, and one such step must not price a size
    for the rest of the run. A size's first step cannot be clipped (nothing is known to clip it against), so its second
    step at a key only ever lowers its relative cost, to the faster of the two: interference slows steps and never
    speeds them up, and a size priced too dear is never chosen, so never measured again, where one priced too cheap is
    chosen and corrected.

    Sizes never measured are priced by the paper's weighted least-squares line through the measured relative costs
    exp(r_i) (sizes >= 2, weights ``W_i = exp(-lambda * o_i)``), times exp(u). Another key's estimates are a prior
    (``seeded_from``): its relative costs with ``PRIOR_VAR`` more variance and its speed unknown, so that the first
    1-node step at the new key sets the speed and every inherited price follows it; when an inherited size is first
    measured, ``PRIOR_SHARED`` of its correction moves the other inherited sizes too (a batch size moves the whole
    cost curve). Its measured effect against the paper's model is in docs/lab."""

    R = 0.01  # variance of log step time between steps at a steady speed (about 10% jitter)
    REL_DRIFT = 0.02  # relative costs drift this much as fast as the speed (in variance)
    UNKNOWN_VAR = 100.0  # variance of a quantity never measured (log scale)
    PRIOR_VAR = 1.0  # extra variance of a relative cost inherited from another key: a batch size can change it e-fold
    PRIOR_SHARED = 0.8  # the share of an inherited size's first correction applied to the other inherited sizes
    CLIP = 3.0  # innovations beyond this many standard deviations are clipped

    def __init__(self, alpha: float, lam: float):
        super().__init__(lam)
        self.q = self.R * alpha * alpha / max(1e-9, 1.0 - alpha)
        self.u, self.vu = 0.0, self.UNKNOWN_VAR  # log speed (1-node step time) and its variance
        self.r: dict[int, float] = {}  # log relative cost of each tree size
        self.vr: dict[int, float] = {}
        self.tick = 0  # clock of the last drift step

    def seeded_from(self, other: "DriftCostModel") -> "DriftCostModel":
        """``other``'s relative costs as a prior (another batch size or context bucket); the speed starts unknown."""
        self.u, self.vu = other.u, self.UNKNOWN_VAR
        self.r = dict(other.r)
        self.vr = {s: v + self.PRIOR_VAR for s, v in other.vr.items()}
        self._inherit(other)
        self.tick = self.clock
        return self

    def observe(self, size: int, seconds: float, now: int | None = None) -> None:
        """Record one step of ``size`` nodes (``now``: see ``_tick``)."""
        self._tick(now)
        steps = max(0, self.clock - self.tick)  # the speed and the relative costs drift while steps pass
        self.tick = self.clock
        self.vu += self.q * steps
        for s in self.vr:
            self.vr[s] += self.q * self.REL_DRIFT * steps
        if size != 1 and size not in self.r:
            self.r[size], self.vr[size] = 0.0, self.UNKNOWN_VAR
        vr = self.vr[size] if size != 1 else 0.0
        S = self.vu + vr + self.R
        e = math.log(max(seconds, 1e-9)) - self.u - self.r.get(size, 0.0)
        if size != 1 and self.n.get(size) == 1:  # a tree size's second step here: keep the faster of its first two
            if e < 0:
                self.r[size] += e
            self.vr[size] *= 1 - vr / S  # as certain as an ordinary second measurement would leave it
            self._count(size)
            return
        bound = self.CLIP * math.sqrt(S)
        e = min(max(e, -bound), bound)
        ku, kr = self.vu / S, vr / S
        self.u += ku * e
        if size == 1:  # only a 1-node step measures the speed alone; a tree step leaves its uncertainty growing
            self.vu *= 1 - ku
        else:
            if self.n.get(size) == 0:  # an inherited size's first measurement here moves the other inherited ones
                for s in self.r:
                    if s != size and self.n.get(s) == 0:
                        self.r[s] += self.PRIOR_SHARED * kr * e
            self.r[size] += kr * e
            self.vr[size] *= 1 - kr
        self._count(size)

    def fit(self) -> tuple[float, float] | None:
        """(beta0, beta1) of the weighted line through the relative costs exp(r_i) of tree sizes >= 2, or None with
        fewer than two."""
        sizes = sorted(self.r)
        if len(sizes) < 2:
            return None
        xs = torch.tensor(sizes, dtype=torch.float64)
        ys = torch.tensor([math.exp(self.r[s]) for s in sizes], dtype=torch.float64)
        w = torch.tensor([math.exp(-self.lam * (self.clock - self.last[s])) for s in sizes], dtype=torch.float64)
        return weighted_line(xs, ys, w)

    def estimate(self, size: int) -> float:
        """T_est(size): exp(u + r_size) for a size measured here or inherited, else exp(u) times the line."""
        if 1 not in self.n and not self.r:
            return float("inf")
        speed = math.exp(self.u)
        if size == 1 or size in self.r:
            return speed * math.exp(self.r.get(size, 0.0))
        fit = self.fit()
        if fit is None:
            return float("inf")
        b0, b1 = fit
        floor = 0.5 * min([1.0] + [math.exp(r) for r in self.r.values()])  # a line through noise promises no free steps
        return speed * max(b0 + b1 * size, floor)

    @property
    def t(self) -> dict[int, float]:
        """The current price of every size measured here or inherited."""
        return {s: self.estimate(s) for s in self.n}


def weighted_line(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Closed-form weighted least squares for y = b0 + b1 x."""
    sw = w.sum()
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    var = (w * (x - mx) ** 2).sum()
    b1 = float((w * (x - mx) * (y - my)).sum() / var) if var > 0 else 0.0
    return float(my - b1 * mx), b1


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
        self.costs: dict[tuple[int, int], CostModel] = {}
        self.key: tuple[int, int] | None = None
        self.size = 1
        self.since = 0
        self.idle = 0  # steps since the last probe
        self.gap = config.probe_every  # steps between probes (doubles while probes confirm 1-node steps)
        self.probed = False  # the last step was a probe: choose again with what it measured
        self.clock = 0  # steps decoded by this sizer, over all keys
        self.cache = _TreeCache()
        self.history: list[int] = []  # tree size used at each step (for analysis)
        self._best: tuple[list, list] | None = None  # best_tree() of the current acceptance estimates
        # EMAs of measured and predicted accepted guesses per tree step, starting from a prior of c = 1: one pair for
        # whole trees and one for the sizes a pruner cuts (``pruned``), whose acceptance also pays for the pruning
        self._gain = {False: [self.CALIBRATION_PRIOR] * 2, True: [self.CALIBRATION_PRIOR] * 2}
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
        measured, predicted = self._gain[pruned]
        return measured / predicted if predicted > 0 else 1.0

    def calibrate(self, measured: float, predicted: float, pruned: bool = False) -> None:
        """One tree step's accepted guesses (mean over rows) and what the estimates predicted for its whole tree."""
        a, g = self.cfg.alpha, self._gain[pruned]
        self._gain[pruned] = [(1 - a) * g[0] + a * measured, (1 - a) * g[1] + a * predicted]

    def _l(self, size: int, values: list[float]) -> float:
        """l(size): 1 + the calibrated sum of the best ``size``-node tree's node values."""
        return 1.0 + self.calibration_for(size in self.pruned) * sum(values[: size - 1])

    @hookimpl
    def propd_setup(self, model):
        K = self.cfg.max_depth or (model.heads.num_heads if model.heads is not None else self.DEFAULT_DEPTH)
        R = self.cfg.max_rank
        # a neutral prior (no pre-characterization): rank r at depth i right with a chance that falls with both
        self.P = [[min(1.0, 0.5 / (i + 1) * (1 + k) / (1 + k + 1)) for k in range(R)] for i in range(K)]

    DEFAULT_DEPTH = 6  # tree depth without Medusa heads to bound it (max_depth sets it)

    def _exploring(self, cost: CostModel | DriftCostModel, values: list[float], entering: bool = False) -> int | None:
        """The next size to measure before the first choice at this key, or None.

        On ``entering`` a key seen before whose 1-node time is older than ``refresh`` steps, one 1-node step is
        measured first: the machine's speed drifts, and fresh tree times against a stale 1-node time pick trees that
        do not pay.

        Sizes are explored smallest first, each tree size ``explore_repeat`` times in a row (one stalled step must not
        price a size for the rest of the run, see ``DriftCostModel``), and exploration stops early once a measured tree step takes at least
        l(largest) times a 1-node step: then no tree that large or larger can pay, even with every guess of the
        largest tree counted, and measuring one (a 64-node tree is 256 rows at batch 4) costs many AR steps. Before
        its last exploration step a size must take twice that to stop exploration."""
        if len(self.costs) > 1 or cost.seeded:  # a later key: it has a prior, rescaled by one fresh 1-node step
            fresh_prior = cost.seeded and cost.n.get(1, 0) == 0
            return 1 if fresh_prior or (entering and cost.age(1, self.clock) > self.cfg.refresh) else None
        repeat = max(1, self.cfg.explore_repeat)
        untried = [s for s in self.explore if cost.n.get(s, 0) < (1 if s == 1 else repeat)]
        if untried and cost.n.get(1, 0) > 0:
            # a size measured fewer than ``repeat`` times is hopeless only at twice the bar: its step may have stalled
            most = self._l(max(self.sizes), values)
            hopeless = [s for s, t in cost.t.items() if s > 1 and cost.n.get(s, 0) > 0
                        and t >= most * cost.t[1] * (1 if cost.n[s] >= repeat else 2)]
            if hopeless:
                untried = [s for s in untried if s < min(hopeless)]
        return untried[0] if untried else None

    def choose(self, cost: CostModel, values: list[float], trees_only: bool = False) -> int:
        """The size maximizing l(i) / T_est(i); ``values`` are the node values of the largest best tree. The caller
        has checked that nothing is left to explore at this key. With ``trees_only``, the best size above 1."""
        best, best_rate = 1, -1.0
        for s in self.sizes[1:] if trees_only and len(self.sizes) > 1 else self.sizes:
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
            self.costs[key] = cost
        # best-first search pops nodes in a fixed order, so the best tree of size s is the first s-1 paths of the
        # largest one: one search serves both the choice and the tree
        if self._best is None:  # searched again only after the acceptance estimates moved
            self._best = best_tree(rank_probabilities(self.P), max(self.sizes))
        paths, values = self._best
        if key != self.key or self.since >= self.cfg.refresh or self.probed:
            entering, was = key != self.key, self.size
            self.key, self.since = key, 0
            first = self._exploring(cost, values, entering)
            self.size = first if first is not None else self.choose(cost, values)
            if self.probed and first is None:  # back off while probes keep confirming that no tree pays
                confirmed = not entering and was == self.size == 1
                self.gap = min(2 * self.gap, self.cfg.probe_max) if confirmed else self.cfg.probe_every
            self.probed = False
            if first is not None or cost.age(self.size, self.clock) > self.cfg.refresh:
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
        if cost is not None:
            cost.observe(tree.num_nodes, stats.step_time_s, now=self.clock)
        if draft.num_nodes <= 1:
            return  # a plain AR step (or a draft that found nothing): no guesses to learn from
        if tree.num_nodes > 1 and self._best is not None:
            present = draft.num_nodes if draft.present is None else float(draft.present.sum(1).float().mean())
            if stats.nodes_after_pruning < present:
                self.pruned.add(tree.num_nodes)
            predicted = sum(self._best[1][: tree.num_nodes - 1])
            self.calibrate(sum(stats.accepted) / len(stats.accepted) - 1.0, predicted, tree.num_nodes in self.pruned)
        self.learn(draft, acceptance)
        self._best = None

    def learn(self, draft, acceptance) -> None:
        """Update P[d][k] from one verified draft, whatever proposed it: along each row's accepted path, the node at
        depth d has a known true successor (the next accepted token, or the bonus); if one of its children carries it,
        the true token was the proposer's choice of that sibling rank. Only ranks the node had children for are
        observed (rank k of a node with n <= k children says nothing), so P[d][k] moves for observed ranks only."""
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
        for d in range(D):
            for r in range(R):
                c = stats[0][d][r]
                if c:
                    keep = (1 - a) ** c  # c EMA updates with the same observation
                    self.P[d][r] = keep * self.P[d][r] + (1 - keep) * stats[1][d][r]


@hookimpl
def propd_register_components(register):
    register("sizer", "medusa-heuristic", MedusaHeuristicSizer, HeuristicConfig,
             "Medusa's offline tree: greedy by expected acceptance from measured per-head top-k accuracies")
    register("sizer", "propd-dynamic", DynamicSizer, DynamicConfig,
             "ProPD dynamic tree sizing: online acceptance EMA + weighted-regression step time, max l(i)/T(i)")
