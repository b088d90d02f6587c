"""Prefill time against ``LlamaModel.PREFILL_CHUNK``: ``ar`` with one new token on long training prompts (the
longest ``awesome_chatgpt_prompts`` TEXT prompts from the 41st on, cut to ``--chars`` characters), the chunk sizes
taking turns; median of ``--repeats``.

    python benchmarks/prefill.py --dtype float32 --batch 1 --chars 16000 --chunks 100000,512
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

from propd.decoder import Decoder
from propd.models.llama import LlamaModel
from propd.models.loading import load_model
from propd.training.data import find_train_dir


def long_prompts(n: int, chars: int) -> list[str]:
    csv.field_size_limit(10**8)
    path = find_train_dir() / "awesome_chatgpt_prompts" / "prompts.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r["prompt"] for r in csv.DictReader(f) if r.get("type") == "TEXT"]
    rows.sort(key=len, reverse=True)
    return [p[:chars] for p in rows[40:40 + n]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chars", type=int, default=6000)
    ap.add_argument("--chunks", default="100000,512", help="PREFILL_CHUNK values (a large one: a single chunk)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompts = long_prompts(args.batch, args.chars)
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)
    dec = Decoder(lm, preset="ar")
    dec.generate(prompts, max_new_tokens=1)  # warm-up
    chunks = [int(c) for c in args.chunks.split(",")]
    times: dict[int, list[float]] = {c: [] for c in chunks}
    default = LlamaModel.PREFILL_CHUNK
    try:
        for _ in range(args.repeats):
            for c in chunks:
                LlamaModel.PREFILL_CHUNK = c
                t = time.perf_counter()
                dec.generate(prompts, max_new_tokens=1)
                times[c].append(time.perf_counter() - t)
    finally:
        LlamaModel.PREFILL_CHUNK = default
    print(f"{args.dtype}, prompt tokens {[len(lm.tokenizer(p).input_ids) for p in prompts]}")
    for c, v in times.items():
        print(f"chunk {c:>6d}: {statistics.median(v):.3f} s (runs {', '.join(f'{x:.3f}' for x in v)})")


if __name__ == "__main__":
    main()
