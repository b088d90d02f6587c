"""TreeSizers ``medusa-heuristic`` and ``propd-dynamic``.

``medusa-heuristic`` (Medusa, Cai et al. 2023, sec. 3.3.1): from per-head top-k accuracies measured offline (the
``report.json`` that ``propd train-heads`` writes beside the heads, on held-out training prompts), grow a tree of a
fixed size greedily, always adding the node of highest expected acceptance.

``propd-dynamic`` (ProPD, Zhong et al. 2024, sec. 4.2): the same construction from *online* estimates, with the
size chosen to maximize expected accepted tokens per second:

* acceptance: for head i and rank k, ``P_i^k <- (1 - alpha) P_i^k + alpha * 1(true token in TopK_i)``, updated
  from each verified token; ``p_i^k = P_i^k - P_i^{k-1}``; the best tree of size i holds the i most valuable nodes
  and its expected accepted length is ``l(i) = 1 + sum of their values``;
* cost: ``T_perf^i <- (1 - alpha) T_perf^i + alpha * t_i`` for every size tried, and a weighted least-squares line
  ``T_est(i) = beta0 + beta1 * i`` with weights ``W_i = exp(-lambda * o_i)``, o_i the steps since size i was last
  measured (closed form);
* the size in S maximizing ``l(i) / T_est(i)`` is chosen, again whenever the live batch size or the context-length
  bucket changes and every ``refresh`` steps; each (batch size, bucket) keeps its own cost model, sizes not yet
  measured are tried first, and the 1-node tree (a plain AR step) is always a candidate.

Step times are the decoder's wall-clock times of whole steps, pruning included, so the two ProPD techniques compose.
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
    alpha: float = 0.05  # EMA rate of the acceptance and step-time estimates
    lam: float = 0.05  # lambda: weight decay of old step-time measurements, per step of age
    refresh: int = 16  # re-choose at least this often (steps)
    context_bucket: int = 256  # re-choose when the longest context crosses a multiple of this
    max_rank: int = 10
    explore_steps: int = 2  # measurements of each size before trusting the line


class CostModel:
    """Step time against tree size: EMA per size and a weighted least-squares line through them."""

    def __init__(self, alpha: float, lam: float):
        self.alpha, self.lam = alpha, lam
        self.t: dict[int, float] = {}  # T_perf^i
        self.n: dict[int, int] = {}  # measurements per size
        self.last: dict[int, int] = {}  # step of the last measurement
        self.clock = 0

    def observe(self, size: int, seconds: float) -> None:
        self.clock += 1
        old = self.t.get(size)
        self.t[size] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self.n[size] = self.n.get(size, 0) + 1
        self.last[size] = self.clock

    def fit(self) -> tuple[float, float] | None:
        """(beta0, beta1) of the weighted fit, or None with fewer than two sizes measured."""
        if len(self.t) < 2:
            return None
        xs = torch.tensor(list(self.t), dtype=torch.float64)
        ys = torch.tensor([self.t[s] for s in self.t], dtype=torch.float64)
        w = torch.tensor([math.exp(-self.lam * (self.clock - self.last[s])) for s in self.t], dtype=torch.float64)
        return weighted_line(xs, ys, w)

    def estimate(self, size: int) -> float:
        fit = self.fit()
        if fit is None:
            return self.t.get(size, float("inf"))
        b0, b1 = fit
        floor = min(self.t.values()) * 0.5  # a line fitted through noise must not promise free steps
        return max(b0 + b1 * size, floor)


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
        self.P: list[list[float]] = []  # P[i][k]: EMA of P(true token within head i's top k+1)
        self.costs: dict[tuple[int, int], CostModel] = {}
        self.key: tuple[int, int] | None = None
        self.size = 1
        self.since = 0
        self.cache = _TreeCache()
        self.history: list[int] = []  # size chosen at each step (for analysis)

    @hookimpl
    def propd_setup(self, model):
        if model.heads is None:
            raise PropdError("propd-dynamic sizes trees of Medusa guesses, but no heads are loaded: pass --heads")
        K, R = model.heads.num_heads, self.cfg.max_rank
        # a neutral prior (no pre-characterization): rank r of head i right with a chance that falls with both
        self.P = [[min(1.0, 0.5 / (i + 1) * (1 + k) / (1 + k + 1)) for k in range(R)] for i in range(K)]

    def choose(self, cost: CostModel, values: list[float]) -> int:
        """The size maximizing l(i) / T_est(i); ``values`` are the node values of the largest best tree."""
        untried = [s for s in self.sizes if cost.n.get(s, 0) < self.cfg.explore_steps]
        if untried:
            return untried[0]
        best, best_rate = 1, -1.0
        for s in self.sizes:
            l_i = 1.0 + sum(values[: s - 1])
            rate = l_i / cost.estimate(s)
            if rate > best_rate:
                best, best_rate = s, rate
        return best

    @hookimpl
    def propd_tree(self, ctx):
        key = (ctx.batch_size, max(ctx.host_lengths) // self.cfg.context_bucket)
        cost = self.costs.setdefault(key, CostModel(self.cfg.alpha, self.cfg.lam))
        exploring = any(cost.n.get(s, 0) < self.cfg.explore_steps for s in self.sizes)
        # best-first search pops nodes in a fixed order, so the best tree of size s is the first s-1 paths of the
        # largest one: one search serves both the choice and the tree
        paths, values = best_tree(rank_probabilities(self.P), max(self.sizes))
        if key != self.key or self.since >= self.cfg.refresh or exploring:
            self.key, self.since = key, 0
            self.size = self.choose(cost, values)
        self.since += 1
        self.history.append(self.size)
        return self.cache.get(paths[: self.size - 1], ctx.device)

    @hookimpl
    def propd_after_step(self, ctx, tree, acceptance, stats, tokens):
        cost = self.costs.get(self.key)
        if cost is not None:
            cost.observe(tree.num_nodes, stats.step_time_s)
        if ctx.heads is None:
            return
        R, K = self.cfg.max_rank, len(self.P)
        top = ctx.head_topk(R)  # (B, K, R): the proposer's guesses this step (computed once, shared)
        path = tree.paths_to[acceptance.best]  # (B, D+1)
        true = torch.cat([tokens.gather(1, path[:, 1:]), acceptance.bonus[:, None]], dim=1)  # (B, D+1)
        known = torch.arange(true.shape[1], device=true.device)[None, :] <= acceptance.accept_len[:, None]
        upto = min(K, true.shape[1])
        # rank of the true token among head i's guesses (R when absent), for heads whose target is known
        hit = top[:, :upto] == true[:, :upto, None]  # (B, upto, R)
        within = hit.cumsum(dim=-1).clamp(max=1).to(torch.float32)  # (B, upto, R): 1(true token in top k+1)
        mask = known[:, :upto].to(torch.float32)  # (B, upto)
        n = mask.sum(dim=0)  # (upto,)
        mean = (within * mask[..., None]).sum(dim=0) / n.clamp(min=1)[:, None]  # (upto, R)
        rows = torch.cat([n[:, None], mean], dim=1).tolist()  # one small transfer per step
        a = self.cfg.alpha
        for i, row in enumerate(rows):
            count, obs = int(row[0]), row[1:]
            for _ in range(count):  # one EMA update per verified token
                self.P[i] = [(1 - a) * p + a * o for p, o in zip(self.P[i], obs)]


@hookimpl
def propd_register_components(register):
    register("sizer", "medusa-heuristic", MedusaHeuristicSizer, HeuristicConfig,
             "Medusa's offline tree: greedy by expected acceptance from measured per-head top-k accuracies")
    register("sizer", "propd-dynamic", DynamicSizer, DynamicConfig,
             "ProPD dynamic tree sizing: online acceptance EMA + weighted-regression step time, max l(i)/T(i)")
