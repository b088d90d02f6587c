"""Continuous batching against fixed batches: tokens per second of a batch job whose answers end at different
lengths (their EOS), with each preset, the two taking turns.

With more prompts than ``--batch-size``, ``Decoder(continuous=True)`` (the default) lets a waiting prompt take the
place of each row that finishes; ``continuous=False`` decodes the prompts in fixed batches, each running until its
last row ends. Both give the same tokens (checked here). The prompts are training prompts (``shared/data/train``'s
vicuna_bench questions), not the benchmark's.

    python benchmarks/continuous.py --presets ar,eagle --batch-size 4 --prompts 24 --max-new 256   # ~10 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from propd.decoder import Decoder
from propd.models.loading import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "vicuna_bench" / "question.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--presets", default="ar,eagle")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="turns per preset and mode (fixed, continuous alternate)")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    lines = Path(args.data).read_text().splitlines()
    prompts = [json.loads(x)["turns"][0] for x in lines[: args.prompts]]
    model = load_model(args.model, dtype=args.dtype)
    print(f"{model.name}, dtype {args.dtype}, {len(prompts)} prompts, batch size {args.batch_size}, "
          f"up to {args.max_new} new tokens")
    print("| preset | fixed batches, tokens/s | continuous, tokens/s | continuous / fixed | share of steps at full batch, "
          "fixed / continuous |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        decoders = {mode: Decoder(model, preset=preset, continuous=mode == "continuous")
                    for mode in ("fixed", "continuous")}
        rate = {mode: [] for mode in decoders}
        full = {mode: 0.0 for mode in decoders}
        tokens = {}
        decoders["fixed"].generate(prompts[:1], max_new_tokens=8)  # warm-up: the extension, caches
        for _ in range(args.rounds):
            for mode, dec in decoders.items():
                t = time.perf_counter()
                res = dec.generate(prompts, max_new_tokens=args.max_new, batch_size=args.batch_size)
                seconds = time.perf_counter() - t
                rate[mode].append(sum(len(x) for x in res.token_ids) / seconds)
                full[mode] = sum(s.batch_size == args.batch_size for s in res.stats) / max(len(res.stats), 1)
                tokens.setdefault(mode, res.token_ids)
        if tokens["fixed"] != tokens["continuous"]:
            raise SystemExit(f"{preset}: continuous batching changed the output")
        f, c = (sum(rate[m]) / len(rate[m]) for m in ("fixed", "continuous"))
        print(f"| `{preset}` | {f:.1f} | {c:.1f} | {c / f:.2f}x | {full['fixed']:.2f} / {full['continuous']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
