"""Spec-Bench questions (Xia et al. 2024, "Unlocking Efficiency in Large Language Model Inference: A Comprehensive
Survey of Speculative Decoding"): ``{"question_id", "category", "turns": [...]}`` per line."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import attrs

from propd.errors import PropdError


@attrs.frozen
class Question:
    question_id: int | str
    category: str
    turn: str


def load_questions(path: str | Path, categories: list[str] | None = None, per_category: int | None = None,
                   limit: int | None = None, turns: str = "first", seed: int = 0) -> list[Question]:
    """Read a question file and take a deterministic sample: ``per_category`` questions of each category (drawn
    with a fixed seed, in file order), or the first ``limit`` after that. ``turns="all"`` makes one prompt per turn
    (each turn asked on its own)."""
    p = Path(path)
    if not p.is_file():
        raise PropdError(f"questions file {p} does not exist")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append((obj["question_id"], obj.get("category", "default"), list(obj["turns"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PropdError(f"{p}:{n}: not a Spec-Bench question (needs question_id and turns)") from None
    by_cat: "OrderedDict[str, list]" = OrderedDict()
    for r in rows:
        by_cat.setdefault(r[1], []).append(r)
    if categories:
        unknown = sorted(set(categories) - set(by_cat))
        if unknown:
            raise PropdError(f"unknown categories {unknown} (known: {', '.join(by_cat)})")
        by_cat = OrderedDict((c, by_cat[c]) for c in by_cat if c in categories)
    picked = []
    for cat, items in by_cat.items():
        if per_category is not None:
            idx = sorted(random.Random(f"{seed}-{cat}").sample(range(len(items)), min(per_category, len(items))))
            items = [items[i] for i in idx]
        picked.extend(items)
    if limit is not None:
        picked = picked[:limit]
    if turns not in ("first", "all"):
        raise PropdError(f"--turns must be 'first' or 'all', got {turns!r}")
    out = []
    for qid, cat, ts in picked:
        for t in ts if turns == "all" else ts[:1]:
            out.append(Question(qid, cat, t))
    if not out:
        raise PropdError(f"no questions selected from {p}")
    return out
