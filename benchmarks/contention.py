"""Decoding on a busy machine: propd `ar` with the thread tuner (``threads="auto"``, the default), at torch's thread
count fixed, and at 1 thread, beside transformers' ``generate``, with competing CPU-bound processes running, in one
run, taking turns (issue: CPU engine at the memory floor, part 5).

    python benchmarks/contention.py                      # one competing process, float32 and gguf
    python benchmarks/contention.py --competitors 0      # the same on a quiet machine

Each competitor is a Python busy loop (one core each). Prints tokens/s (greedy, batch 1, a 100-token prompt, the
prefill included) per engine, medians over the rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

from propd.decoder import Decoder
from propd.models.loading import fetch_known_model, load_model

MODEL = "smollm2-135m-instruct"


def busy(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,gguf")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers' generate out")
    args = ap.parse_args()
    n = torch.get_num_threads()
    prompt = list(range(1000, 1100))
    engines = {}
    for dt in args.dtypes.split(","):
        lm = load_model(MODEL, dtype=dt)
        engines[f"propd ar {dt}, threads auto"] = Decoder(lm, preset="ar")
        engines[f"propd ar {dt}, {n} threads"] = Decoder(lm, preset="ar", threads=n)
        engines[f"propd ar {dt}, 1 thread"] = Decoder(lm, preset="ar", threads=1)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(fetch_known_model(MODEL)), torch_dtype=torch.float32).eval()
        engines[f"transformers generate float32, {n} threads"] = hf

    def run(engine) -> float:
        t = time.perf_counter()
        if engine is hf:
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False,
                              min_new_tokens=args.tokens)
            made = out.shape[1] - ids.shape[1]
        else:
            made = sum(engine.generate_ids([prompt], max_new_tokens=args.tokens).new_tokens)
        return made / (time.perf_counter() - t)

    for engine in engines.values():  # warm-up
        run(engine)
    procs = [mp.Process(target=busy, args=(3600,), daemon=True) for _ in range(args.competitors)]
    for p in procs:
        p.start()
    try:
        rates: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                rates[name].append(run(engine))
    finally:
        for p in procs:
            p.terminate()
    print(f"{args.competitors} competing process(es), {n} torch threads, batch 1, {args.tokens} tokens after a "
          f"100-token prompt, median of {args.rounds} rounds")
    for name, r in rates.items():
        print(f"{name:42s} {statistics.median(r):7.1f} tokens/s")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
