"""The EAGLE draft in one extension call against the same steps by torch ops (``eagle:native=false``): drafting time
per step and speed over ``ar``, batch 1, the three decoders taking turns prompt by prompt so that the machine's drift
slows them alike. The drafts are the same bit for bit (tests/strategies/test_eagle.py), so the accepted tokens per
step are too.

    python benchmarks/eagle_draft.py --dtype gguf          # about a minute per round on 2 CPU cores
    python benchmarks/eagle_draft.py --dtype float32 --rounds 2
"""

from __future__ import annotations

import argparse

import torch

from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.presets import EAGLE_BUDGET

PROMPTS = ["Why is the sky blue?", "Write a short poem about the sea.", "Explain how a hash table works.",
           "Give me three tips for a job interview.", "What is the capital of Australia and why?", "Describe a cat."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="gguf")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=128)
    args = ap.parse_args()
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)
    runs = {"ar": Decoder(lm, preset="ar"), "eagle (one call)": Decoder(lm, preset="eagle"),
            "eagle (torch steps)": Decoder(lm, preset=None, sizer=f"static:tree={EAGLE_BUDGET}",
                                           proposer="eagle:top_k=4,native=false")}
    for dec in runs.values():
        dec.generate(PROMPTS[:1], max_new_tokens=8)  # warm-up: packing, the screen, first calls
    total = {name: [0, 0.0, 0.0, 0] for name in runs}  # tokens, step time, draft time, steps
    for _ in range(args.rounds):
        for prompt in PROMPTS:
            for name, dec in runs.items():
                r = dec.generate([prompt], max_new_tokens=args.max_new)
                t = total[name]
                t[0] += r.new_tokens[0]
                t[1] += sum(s.step_time_s for s in r.stats)
                t[2] += sum(s.draft_time_s for s in r.stats)
                t[3] += len(r.stats)
    ar_rate = total["ar"][0] / total["ar"][1]
    print(f"{args.dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds of {len(PROMPTS)} prompts, "
          f"{args.max_new} new tokens")
    print(f"{'method':20s} {'step ms':>8s} {'draft ms':>9s} {'tok/step':>9s} {'speed/ar':>9s}")
    for name, (tokens, step, draft, steps) in total.items():
        print(f"{name:20s} {1000 * step / steps:8.2f} {1000 * draft / steps:9.2f} {tokens / steps:9.2f} "
              f"{tokens / step / ar_rate:9.3f}")


if __name__ == "__main__":
    main()
