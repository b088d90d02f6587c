"""Training prompts: ``shared/data/train`` only (awesome-chatgpt-prompts TEXT rows, EAGLE's Alpaca questions,
Vicuna-bench). Nothing under ``bench/`` is ever read here: the benchmark is never trained on."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from pathlib import Path

from propd.errors import PropdError

MAX_PROMPT_CHARS = 1500  # some awesome-chatgpt-prompts rows run to 144k characters


def find_train_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$PROPD_TRAIN_DATA``, else the nearest ``shared/data/train`` above the cwd or package."""
    if explicit is None:
        explicit = os.environ.get("PROPD_TRAIN_DATA")
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise PropdError(f"training data directory {p} does not exist")
        return p
    for base in (Path.cwd(), Path(__file__).resolve()):
        for parent in [base, *base.parents]:
            cand = parent / "shared" / "data" / "train"
            if cand.is_dir():
                return cand
    raise PropdError("no training data found: pass --data DIR (the shared/data/train folder)")


def training_prompts(data_dir: str | Path, max_prompts: int | None = None, seed: int = 0) -> list[str]:
    d = Path(data_dir)
    if "bench" in d.resolve().parts:
        raise PropdError(f"refusing to train on {d}: benchmark data is never used for training")
    prompts: list[str] = []
    awesome = d / "awesome_chatgpt_prompts" / "prompts.csv"
    if awesome.is_file():
        csv.field_size_limit(sys.maxsize)
        with awesome.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("type") == "TEXT" and row.get("prompt", "").strip():
                    prompts.append(row["prompt"].strip()[:MAX_PROMPT_CHARS])
    for name in ("eagle_alpaca", "vicuna_bench"):
        q = d / name / "question.jsonl"
        if q.is_file():
            for line in q.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    prompts.append(json.loads(line)["turns"][0][:MAX_PROMPT_CHARS])
    if not prompts:
        raise PropdError(f"no training prompts found in {d}")
    random.Random(seed).shuffle(prompts)
    return prompts[:max_prompts] if max_prompts else prompts
