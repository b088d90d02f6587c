"""TreeSizer ``medusa-heuristic`` (Medusa, Cai et al. 2023, sec. 3.3.1): from per-head top-k accuracies measured
offline (the ``report.json`` that ``propd train-heads`` writes beside the heads, on held-out training prompts), grow a
tree of a fixed size greedily, always adding the node of highest expected acceptance (:func:`propd.tree.best_tree`).
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.tree import TreeCache, best_tree, rank_probabilities


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


@attrs.frozen
class HeuristicConfig:
    size: int = attrs.field(default=64, validator=attrs.validators.ge(1))  # nodes, the root included
    accuracies: str | None = None  # a report.json; default: the one beside the loaded heads
    max_rank: int = 10


class MedusaHeuristicSizer:
    def __init__(self, config: HeuristicConfig):
        self.cfg = config
        self.paths: list[tuple[int, ...]] | None = None
        self.cache = TreeCache()

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


@hookimpl
def propd_register_components(register):
    register("sizer", "medusa-heuristic", MedusaHeuristicSizer, HeuristicConfig,
             "Medusa's offline tree: greedy by expected acceptance from measured per-head top-k accuracies")
