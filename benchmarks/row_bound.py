"""Where propd's packed CPU kernel should stop taking float32 (and GGUF) products: ``cpu_kernel.MAX_ROWS`` values
taking turns in one process, on (1) prefills of chat prompts of several lengths (``ar`` with one new token) and (2)
the layer stacks of decoding steps of B rows x T tree nodes at a 200-token context. Medians; every value gives the
same first token (checked).

    python benchmarks/row_bound.py                            # float32, bounds 64,128,256; about 4 minutes
    python benchmarks/row_bound.py --dtype gguf --bounds 64,128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from propd.chat import encode_chat
from propd.decoder import Decoder
from propd.models import cpu_kernel
from propd.models.loading import load_model

TEXT = "Write a detailed essay about the history of the printing press and its effects on European society. " * 80


def prefills(lm, bounds: list[int], lengths: list[int], reps: int) -> None:
    dec = Decoder(lm, preset="ar")
    ids = lm.tokenizer(TEXT).input_ids
    extra = len(encode_chat(lm.tokenizer, [{"role": "user", "content": "x"}])) - 1  # the chat template's tokens
    print("prefill (chat tokens): ms per bound " + ", ".join(map(str, bounds)))
    for total in lengths:
        prompt = lm.tokenizer.decode(ids[:total - extra])
        n = len(encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}]))
        times: dict[int, list[float]] = {b: [] for b in bounds}
        firsts = set()
        for rep in range(reps + 1):
            for b in bounds if rep % 2 else bounds[::-1]:
                cpu_kernel.MAX_ROWS = b
                t = time.perf_counter()
                r = dec.generate([prompt], max_new_tokens=1)
                if rep:  # the first round warms up
                    times[b].append(time.perf_counter() - t)
                firsts.add(tuple(r.token_ids[0]))
        same = "same token" if len(firsts) == 1 else "TOKENS DIFFER"
        print(f"{n:5d}: " + "  ".join(f"{statistics.median(times[b]) * 1e3:7.0f}" for b in bounds) + f"   {same}")


def steps(lm, bounds: list[int], shapes: list[tuple[int, int]], reps: int, ctx: int = 200) -> None:
    m = lm.model
    m.prepare()
    print(f"decoding step's layers (B x T rows, {ctx}-token context): ms per bound " + ", ".join(map(str, bounds)))
    for B, T in shapes:
        cache = m.new_cache(B, ctx + T + 8)
        m.prefill(cache, [list(range(1000 + b, 1000 + b + ctx)) for b in range(B)])
        mask, depth = torch.ones(T, T, dtype=torch.bool).tril(), torch.arange(T)
        node_idx, tok = torch.arange(T).expand(B, T), torch.arange(5, 5 + T).expand(B, T)
        times: dict[int, list[float]] = {b: [] for b in bounds}
        for rep in range(reps + 1):
            for b in bounds if rep % 2 else bounds[::-1]:
                cpu_kernel.MAX_ROWS = b
                a = m.attention_inputs(cache, node_idx, mask, depth)
                x = m.embed(tok)
                t = time.perf_counter()
                m.run_layers(x, 0, m.num_layers, cache, a)
                if rep:
                    times[b].append(time.perf_counter() - t)
        medians = "  ".join(f"{statistics.median(times[b]) * 1e3:7.1f}" for b in bounds)
        print(f"{B:3d} x {T:2d} = {B * T:3d}: {medians}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bounds", default="64,128,256")
    ap.add_argument("--lengths", default="80,128,192,256")
    ap.add_argument("--shapes", default="16x4,16x6,8x10,16x8,16x12,16x16", help="B x T decoding steps")
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    bounds = [int(b) for b in args.bounds.split(",")]
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)
    default = cpu_kernel.MAX_ROWS
    try:
        with torch.inference_mode():
            prefills(lm, bounds, [int(n) for n in args.lengths.split(",")], args.reps)
            steps(lm, bounds, [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")], args.reps)
    finally:
        cpu_kernel.MAX_ROWS = default


if __name__ == "__main__":
    main()
