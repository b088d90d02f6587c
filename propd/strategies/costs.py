"""Step-time models for ``propd-dynamic`` (ProPD, Zhong et al. 2024, sec. 4.2): the paper's ``CostModel`` (an EMA
T_perf^i per tree size and a weighted least-squares line ``T_est(i) = beta0 + beta1 * i`` with weights
``W_i = exp(-lambda * o_i)``) and the default ``DriftCostModel`` (machine speed x relative cost of a size).
"""

from __future__ import annotations

import math

import torch


class _Measured:
    """What both cost models keep about their measurements: per size, how many were fresh at this key and when."""

    PRIOR_WEIGHT = 0.1  # a prior counts like a measurement this much older than the newest: exp(-lambda * age)

    def __init__(self, lam: float):
        self.lam = lam
        self.n: dict[int, int] = {}  # fresh measurements per size (0 for a prior inherited from another key)
        self.foreign = False  # the prior came from another batch size (DynamicSizer.choose trusts it less)
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
        step (matrix-vector products), a 2- or 4-node tree and an 8-node tree sit on different curves (a 3-node step
        can cost more than a 4-node one; docs/lab), and a line through sizes 8 and 64 would price the 4-node tree like
        the 8-node one. So the line (the paper's regression) only prices sizes not yet
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
    step at a key only ever lowers its price, to the faster of the two: interference slows steps and never speeds them
    up, and a size priced too dear is never chosen, so never measured again, where one priced too cheap is chosen and
    corrected. The 1-node step is no exception: a stalled first one prices the speed too high, every tree then looks
    cheap beside it (a tree's relative cost absorbs the difference), and 1-node steps, rarely run after that, would
    correct it only a clipped share at a time.

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
        if self.n.get(size) == 1:  # a size's second step here: keep the faster of its first two, as certain as an
            if size == 1:  # ordinary second measurement would leave it
                self.u += min(e, 0.0)
                self.vu *= 1 - self.vu / S
            else:
                self.r[size] += min(e, 0.0)
                self.vr[size] *= 1 - vr / S
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
