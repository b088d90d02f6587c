"""The ``lm_head``'s argmax through the Q8 screen (:mod:`propd.models.screen`) against the full product, on
the default model's own hidden states: equal ids at every position, time per call, candidates per row.

    python benchmarks/argmax_screen.py          # about 40 seconds on 2 CPU cores
    python benchmarks/argmax_screen.py gguf     # the GGUF blocks' lm_head (Q8_0) as the full product
    python benchmarks/argmax_screen.py bfloat16  # a bfloat16 lm_head (its logits rounded to bfloat16)

The hidden states are the final normed states of a few chat prompts and the model's greedy answers to them (every
position, one row at a time, as a batch-1 decoding step sees them).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_times import median_ms  # noqa: E402

from propd.decoder import Decoder  # noqa: E402
from propd.models.loading import load_model  # noqa: E402
from propd.models.screen import ArgmaxScreen  # noqa: E402

PROMPTS = ["Explain how photosynthesis works, step by step.", "Write a short poem about the sea.",
           "What is 17 times 23? Show your work.", "Summarize the causes of the First World War in three sentences."]


@torch.inference_mode()
def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    lm = load_model("smollm2-135m-instruct", dtype=dtype)
    lm.prepare()
    m = lm.model
    t = time.perf_counter()
    screen = ArgmaxScreen(m.lm_head.weight.detach())
    print(f"{dtype}: screen built in {time.perf_counter() - t:.2f} s")
    dec = Decoder(lm, preset="ar")
    res = dec.generate(PROMPTS, max_new_tokens=64)
    states = []
    for ids in (list(p) + out for p, out in zip(dec.encode(PROMPTS), res.token_ids)):
        cache = m.new_cache(1, len(ids) + 8)
        _, hidden = m.prefill(cache, [ids], keep_hidden=True)
        states.append(m.norm(hidden[0]))
    h = torch.cat(states)  # (positions, H)
    same, counts = 0, []
    for i in range(h.shape[0]):
        x = h[i:i + 1]
        same += int(screen.argmax(x, m.logits)[0] == m.logits(x).argmax(dim=-1)[0])
        counts.append(int(screen.candidates(x)[0]))
    print(f"{same} of {h.shape[0]} positions: the same id; candidates per row: median {statistics.median(counts)}, "
          f"90th percentile {sorted(counts)[int(0.9 * len(counts))]}, max {max(counts)}")
    x = h[-1:]
    full, screened = median_ms(lambda: m.logits(x).argmax(dim=-1)), median_ms(lambda: screen.argmax(x, m.logits))
    print(f"one row: full lm_head + argmax {full:.2f} ms, screen {screened:.2f} ms ({full / screened:.2f}x)")
    total = [median_ms(lambda: m.logits(h[i:i + 1]).argmax(dim=-1), 3) for i in range(0, h.shape[0], 8)]
    scr = [median_ms(lambda: screen.argmax(h[i:i + 1], m.logits), 3) for i in range(0, h.shape[0], 8)]
    print(f"every 8th position: full {statistics.mean(total):.2f} ms, screen {statistics.mean(scr):.2f} ms on average")
    print("rows per call (consecutive positions, as a chain step or a batch): full / screen, ms")
    for n in (1, 2, 4, 8, 12, 16, 24, 32):
        x = h[-n:]
        full, screened = median_ms(lambda: m.logits(x).argmax(dim=-1)), median_ms(lambda: screen.argmax(x, m.logits))
        print(f"  {n:2d} rows: {full:6.2f} / {screened:6.2f} ({full / screened:.2f}x)")


if __name__ == "__main__":
    main()
