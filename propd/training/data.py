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

DEFAULT_MAX_PROMPTS = 400  # train-heads distils from this many; propd tune holds out the rest
MAX_PROMPT_CHARS = 1500  # some awesome-chatgpt-prompts rows run to 144k characters
# Second user turns for ``train-heads --kind eagle --follow-ups K``: generic requests about the model's own first
# answer (no task of any benchmark), so that one training prompt yields K more conversations in the model's voice.
FOLLOW_UPS = ("Summarize your answer in two sentences.", "Continue.", "Explain that in simpler words.",
              "Rewrite your answer as a short bulleted list.", "Give one concrete example.",
              "What is the most important point, and why?", "Write a short title for your answer.",
              "Rewrite your answer more formally.")
# Single-turn requests for ``train-heads --kind eagle --tasks K``: each wraps the model's own first answer to a training
# prompt ({text}) in a user turn, so that the drafter also learns answers that read a long user-given text (summaries,
# extraction, question answering over a passage, rewriting, translation), where most output copies or condenses the
# input. Written as common request types, not from any benchmark's prompts.
TASKS = ("Summarize the following text in a few sentences.\n\n{text}",
         "Extract the key facts from the text below as a short bulleted list.\n\n{text}",
         "Read the passage and answer the question.\n\nPassage: {text}\n\nQuestion: What is the main point of the "
         "passage, and what reasons does it give?",
         "Translate the following text into French.\n\n{text}",
         "Rewrite the following text in plain, simple English.\n\n{text}",
         "Write a short headline and a one-paragraph summary for this article.\n\n{text}",
         "Answer using only the information in the document below: which steps or recommendations does it list?"
         "\n\nDocument:\n{text}",
         "Correct any grammar or spelling mistakes in the following text and return the corrected text.\n\n{text}")


def find_train_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$PROPD_TRAIN_DATA``, else the nearest ``shared/data/train`` at or above the working
    directory (a checkout beside this project's shared data); the installed package assumes no location of its own."""
    if explicit is None:
        explicit = os.environ.get("PROPD_TRAIN_DATA")
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise PropdError(f"training data directory {p} does not exist")
        return p
    base = Path.cwd()
    for parent in [base, *base.parents]:
        cand = parent / "shared" / "data" / "train"
        if cand.is_dir():
            return cand
    raise PropdError("no training data found: pass --data DIR (a folder of training prompts, e.g. shared/data/train) "
                     "or set PROPD_TRAIN_DATA")


def awesome_texts(data_dir: str | Path) -> list[str]:
    """The awesome-chatgpt-prompts TEXT rows of ``data_dir`` (none if the file is absent), stripped, whole, in file
    order."""
    awesome = Path(data_dir) / "awesome_chatgpt_prompts" / "prompts.csv"
    if not awesome.is_file():
        return []
    csv.field_size_limit(sys.maxsize)  # some rows run to 144k characters
    with awesome.open(newline="", encoding="utf-8") as f:
        return [row["prompt"].strip() for row in csv.DictReader(f)
                if row.get("type") == "TEXT" and row.get("prompt", "").strip()]


def training_examples(data_dir: str | Path, seed: int = 0) -> list[tuple[str, str]]:
    """Every training prompt as ``(source, text)`` in the seeded shuffled order that ``train-heads`` consumes."""
    d = Path(data_dir)
    if "bench" in d.resolve().parts:
        raise PropdError(f"refusing to train on {d}: benchmark data is never used for training")
    examples = [("awesome_chatgpt_prompts", text[:MAX_PROMPT_CHARS]) for text in awesome_texts(d)]
    for name in ("eagle_alpaca", "vicuna_bench"):
        q = d / name / "question.jsonl"
        if q.is_file():
            for line in q.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    examples.append((name, json.loads(line)["turns"][0][:MAX_PROMPT_CHARS]))
    if not examples:
        raise PropdError(f"no training prompts found in {d}")
    random.Random(seed).shuffle(examples)
    return examples


def training_prompts(data_dir: str | Path, max_prompts: int | None = None, seed: int = 0) -> list[str]:
    """The prompts ``train-heads`` distils from: the first ``max_prompts`` of :func:`training_examples`."""
    prompts = [text for _, text in training_examples(data_dir, seed)]
    return prompts[:max_prompts] if max_prompts else prompts


def held_out_questions(data_dir: str | Path, skip: int, limit: int, seed: int = 0) -> list[dict]:
    """Training prompts that ``train-heads --max-prompts skip`` did not see, in Spec-Bench question format
    (category = source), for choosing parameters without touching the benchmark. Up to ``limit`` per source, taken
    in shuffled order, so the small sources are represented beside awesome-chatgpt-prompts."""
    rest = training_examples(data_dir, seed)[skip:]
    if not rest:
        raise PropdError(f"no held-out training prompts: only {skip} or fewer exist")
    per_source: dict[str, list[str]] = {}
    for source, text in rest:
        if len(per_source.setdefault(source, [])) < limit:
            per_source[source].append(text)
    return [{"question_id": f"{source}-{i}", "category": source, "turns": [text]}
            for source, texts in sorted(per_source.items()) for i, text in enumerate(texts)]
