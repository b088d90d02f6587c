"""Decoding speed with the model file's GGUF blocks kept quantized (``dtype="gguf"``, and ``gguf-q8`` with 8-bit
activations) against float32 and bfloat16, in one run, taking turns prompt by prompt so that a busy machine slows every
dtype alike; checks that ``gguf`` gives float32's tokens on every prompt, and every preset its dtype's ``ar`` tokens.

    python benchmarks/gguf_dtype.py                          # ar, Spec-Bench sample (1 per category), 64 tokens
    python benchmarks/gguf_dtype.py --presets ar,eagle,propd --batch-size 4
    python benchmarks/gguf_dtype.py --dtypes float32,gguf,gguf-q8 --presets ar,propd,eagle,lookup

Prints tokens/s per dtype and preset two ways, each with its ratio to float32 ``ar``: generated tokens over wall time
(prefill included), and the decoding steps alone (tokens the steps accepted over the steps' time, as llama.cpp's
``llama-bench -p 0`` counts).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from propd.bench.questions import load_questions
from propd.decoder import Decoder
from propd.models.loading import load_model

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench" / "spec_bench" / "question.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default=str(SPEC_BENCH))
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--presets", default="ar")
    ap.add_argument("--dtypes", default="float32,bfloat16,gguf")
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args()
    prompts = [q.turn for q in load_questions(args.questions, per_category=args.per_category, turns="first")]
    dtypes, presets = args.dtypes.split(","), args.presets.split(",")
    decoders = {}
    for dt in dtypes:
        model = load_model("smollm2-135m-instruct", dtype=dt)
        for p in presets:
            decoders[(dt, p)] = Decoder(model, preset=p)
            decoders[(dt, p)].generate(prompts[:1], max_new_tokens=8)  # warm-up
    bs = args.batch_size
    tokens = {k: 0 for k in decoders}
    wall = {k: 0.0 for k in decoders}
    step_tokens = {k: 0 for k in decoders}
    step_time = {k: 0.0 for k in decoders}
    out = {k: [] for k in decoders}
    for i in range(0, len(prompts), bs):  # turns: each batch of prompts through every decoder
        for k, dec in decoders.items():
            t = time.perf_counter()
            r = dec.generate(prompts[i:i + bs], max_new_tokens=args.max_new_tokens, batch_size=bs)
            wall[k] += time.perf_counter() - t
            tokens[k] += sum(r.new_tokens)
            step_tokens[k] += sum(sum(st.accepted) for st in r.stats)
            step_time[k] += sum(st.step_time_s for st in r.stats)
            out[k] += r.token_ids
    ref = ("float32", "ar") if ("float32", "ar") in decoders else next(iter(decoders))
    base = tokens[ref] / wall[ref]
    base_steps = step_tokens[ref] / step_time[ref]
    print(f"{len(prompts)} prompts, batch {bs}, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"{'dtype':10s} {'preset':12s} {'tokens/s':>9s} {'ratio':>6s} {'steps tok/s':>12s} {'ratio':>6s}  "
          f"equal to float32 ar, to this dtype's ar")
    for k in decoders:
        same = out[k] == out[("float32", "ar")] if ("float32", "ar") in out else "-"
        own = out[k] == out[(k[0], "ar")] if (k[0], "ar") in out else "-"
        rate, steps = tokens[k] / wall[k], step_tokens[k] / step_time[k]
        print(f"{k[0]:10s} {k[1]:12s} {rate:9.1f} {rate / base:5.2f}x {steps:12.1f} {steps / base_steps:5.2f}x  "
              f"{same}, {own}")
    print(f"ratios are to {'/'.join(ref)}")

if __name__ == "__main__":
    with torch.inference_mode():
        main()
