"""Spec-Bench questions (Xia et al. 2024, "Unlocking Efficiency in Large Language Model Inference: A Comprehensive
Survey of Speculative Decoding"): ``{"question_id", "category", "turns": [...]}`` per line."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import attrs

from propd.errors import PropdError
from propd.files import read_text_file


@attrs.frozen
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]  # asked in order, as one conversation (each turn sees the earlier turns and answers)

    @property
    def turn(self) -> str:
        return self.turns[0]


def load_questions(path: str | Path, categories: list[str] | None = None, per_category: int | None = None,
                   limit: int | None = None, turns: str = "all", seed: int = 0) -> list[Question]:
    """Read a question file and take a deterministic sample: ``per_category`` questions of each category (drawn
    with a fixed seed, in file order), or the first ``limit`` after that. ``turns="all"`` keeps every turn of a question,
    asked as one conversation as Spec-Bench's runners do (MT-bench's second turns follow the model's first answers);
    ``"first"`` keeps the first turn only."""
    p = Path(path)
    rows = []
    for n, line in enumerate(read_text_file(p, "questions file").splitlines(), start=1):
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
        if not ts or not all(isinstance(t, str) and t.strip() for t in ts):
            raise PropdError(f"{p}: question {qid!r} has an empty or non-text turn")
        out.append(Question(qid, cat, tuple(ts) if turns == "all" else tuple(ts[:1])))
    if not out:
        raise PropdError(f"no questions selected from {p}")
    return out
