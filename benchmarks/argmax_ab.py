"""Decoding with the extension's argmax (``cpu_kernel.argmax``) against torch's ``argmax(dim=-1)``, taking turns in
one process: the decoding steps' tokens/s with each (from the steps' own timers), medians over the rounds, and
whether the outputs are equal.

    python benchmarks/argmax_ab.py gguf ar          # dtype, preset; 4 rounds of 4 prompts x 64 tokens
    python benchmarks/argmax_ab.py bfloat16 eagle
"""

from __future__ import annotations

import statistics
import sys

from propd import Decoder
from propd.models import cpu_kernel
from propd.models.loading import load_model

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how vaccines work to a ten-year-old.",
           "List five tips for staying productive while working from home.", "What are the causes of inflation?"]


def main() -> None:
    dtype, preset = (sys.argv[1:3] + ["gguf", "ar"][len(sys.argv[1:3]):])[:2]
    dec = Decoder(load_model("smollm2-135m-instruct", dtype=dtype), preset=preset)
    dec.generate(PROMPTS[:1], max_new_tokens=16)
    kernel = cpu_kernel.argmax
    ways = {"kernel": kernel, "torch": lambda x: x.argmax(dim=-1)}
    rates: dict[str, list[float]] = {w: [] for w in ways}
    outs: dict[str, list] = {w: [] for w in ways}
    try:
        for _ in range(4):
            for name, fn in ways.items():
                cpu_kernel.argmax = fn
                tokens, seconds = 0, 0.0
                for p in PROMPTS:
                    r = dec.generate([p], max_new_tokens=64)
                    tokens += sum(s.accepted[0] for s in r.stats)
                    seconds += sum(s.step_time_s for s in r.stats)
                    outs[name].append(r.token_ids[0])
                rates[name].append(tokens / seconds)
    finally:
        cpu_kernel.argmax = kernel
    k, t = statistics.median(rates["kernel"]), statistics.median(rates["torch"])
    print(f"{dtype} {preset}: decoding-step tokens/s, kernel argmax {k:.1f}, torch argmax {t:.1f}, ratio {k / t:.3f}; "
          f"same output {outs['kernel'] == outs['torch']}")


if __name__ == "__main__":
    main()
