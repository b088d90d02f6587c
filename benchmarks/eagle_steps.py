"""EAGLE trees against Medusa's at batch 1: accepted tokens per step, acceptance per depth, and where a step's time
goes (drafting vs the base model's verification), on prompts no drafter or head was trained on; ``propd-eagle``
beside them shows what its sizer makes of the same drafts.

The prompts are the EAGLE drafter's validation split (held out of its training: the split of ``report.json``'s
config over ``shared/data/train``), so tree parameters chosen from this run are not tuned on the benchmark.

    python benchmarks/eagle_steps.py --prompts 8 --max-new 96        # about 10 minutes on 2 CPU cores
    python benchmarks/eagle_steps.py --drafter out/eagle --trees 16,32 --top-k 8 --depth 6
    python benchmarks/eagle_steps.py --tasks --trees 3,4 --depth 4 --top-k 4   # held-out answers in task requests

With ``--tasks`` each held-out prompt is replaced by a request around the model's own answer to it (``data.TASKS``,
request i mod 8: summarize, extract, translate, answer a question about it, ...), the kind of long user-given text that
``train-heads --kind eagle --tasks K`` trains on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.strategies.eagle import EagleConfig, EagleProposer


def take_turns(runs: dict, prompts: list, max_new: int, batch: int = 1) -> dict:
    """Decode ``prompts`` with every decoder of ``runs`` (name -> Decoder), taking turns batch by batch so that the
    machine's drift slows them alike; per name: new tokens, summed step time, tokens per step (mean over a step's
    rows) and nodes per step."""
    rows = {name: {"tokens": 0, "time": 0.0, "accepted": [], "nodes": []} for name in runs}
    for i in range(0, len(prompts), batch):
        for name, dec in runs.items():
            r = dec.generate(prompts[i:i + batch], max_new_tokens=max_new)
            row = rows[name]
            row["tokens"] += sum(r.new_tokens)
            row["time"] += sum(s.step_time_s for s in r.stats)
            row["accepted"] += [statistics.mean(s.accepted) for s in r.stats]
            row["nodes"] += [s.tree_nodes for s in r.stats]
    return rows


def print_turns(rows: dict) -> None:
    """:func:`take_turns`' table: tokens and nodes per step, step time (ms) and speed over the run named ``ar``."""
    ar_rate = rows["ar"]["tokens"] / rows["ar"]["time"]
    width = max(len(name) for name in rows)
    print(f"{'method':{width}s} {'tok/step':>8s} {'nodes':>6s} {'step ms':>8s} {'speed/ar':>8s}")
    for name, row in rows.items():
        steps = len(row["accepted"])
        print(f"{name:{width}s} {statistics.mean(row['accepted']):8.2f} {statistics.mean(row['nodes']):6.2f} "
              f"{1000 * row['time'] / steps:8.1f} {row['tokens'] / row['time'] / ar_rate:8.3f}")


def held_out_prompts(drafter_dir: Path, n: int) -> list[str]:
    from propd.training.eagle import EagleTrainConfig
    from propd.training.trainer import _val_seqs, training_prompt_texts

    cfg = EagleTrainConfig(**json.loads((drafter_dir / "report.json").read_text())["config"])
    prompts = training_prompt_texts(cfg)
    val = sorted(_val_seqs(len(prompts), cfg))
    return [prompts[i] for i in val[:n]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", default=None, help="EAGLE drafter directory (default: the shipped one)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--trees", default="8,16,32", help="EAGLE tree sizes N (nodes per row, root included)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", action="store_true", help="wrap each prompt's greedy answer in a task request")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out: medusa, propd-eagle")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)  # the shipped Medusa heads (and drafter)
    if args.drafter:
        lm.load_drafter(args.drafter)
    if lm.drafter is None:
        raise SystemExit("no EAGLE drafter loaded (pass --drafter DIR)")
    from propd.models.loading import shipped_heads

    drafter_dir = Path(args.drafter) if args.drafter else shipped_heads("smollm2-135m-instruct") / "eagle"
    prompts = held_out_prompts(drafter_dir, args.prompts)
    if args.tasks:
        from propd.training.data import TASKS

        answers = Decoder(lm, preset="ar").generate(prompts, max_new_tokens=128).texts  # as train-heads answers
        prompts = [TASKS[i % len(TASKS)].format(text=a.strip() or "...") for i, a in enumerate(answers)]
    runs = {"ar": Decoder(lm, preset="ar"), "medusa": Decoder(lm, preset="medusa"),
            "propd-eagle": Decoder(lm, preset="propd-eagle")}  # the sizer choosing N online
    for name in filter(None, args.skip.split(",")):
        if name not in ("medusa", "propd-eagle"):
            raise SystemExit(f"--skip takes medusa and propd-eagle, not {name!r}")
        del runs[name]
    for n in (int(x) for x in args.trees.split(",")):
        runs[f"eagle N={n}"] = Decoder(lm, preset=None, sizer=f"static:tree=budget:{n}:{min(args.depth, n - 1)}",
                                       proposer=EagleProposer(EagleConfig(top_k=args.top_k, depth=args.depth)))
    rows = {name: {"tokens": 0, "time": 0.0, "steps": [], "accept": [], "draft": []} for name in runs}
    for p in prompts:  # methods take turns prompt by prompt: drift in the machine's speed hits them alike
        for name, dec in runs.items():
            r = dec.generate([p], max_new_tokens=args.max_new)
            row = rows[name]
            row["tokens"] += r.new_tokens[0]
            row["time"] += sum(s.step_time_s for s in r.stats)
            row["steps"] += [s.step_time_s for s in r.stats]
            row["accept"] += [s.accepted[0] - 1 for s in r.stats]
            row["draft"] += [s.draft_time_s for s in r.stats if s.tree_nodes > 1]
    ar_rate = rows["ar"]["tokens"] / rows["ar"]["time"]
    report = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}, "prompts": len(prompts),
              "tasks": args.tasks,
              "max_new": args.max_new, "dtype": args.dtype, "top_k": args.top_k, "depth": args.depth, "methods": {}}
    print(f"{'method':14s} {'tok/step':>8s} {'speed/ar':>8s} {'step ms':>8s} {'draft ms':>8s}  P(accept >= d), d = 1..6")
    for name, row in rows.items():
        acc = row["accept"]
        per_depth = [round(sum(a >= d for a in acc) / len(acc), 3) for d in range(1, 7)]
        m = {"tokens_per_step": round(1 + statistics.mean(acc), 3),
             "speed_vs_ar": round(row["tokens"] / row["time"] / ar_rate, 3),
             "median_step_ms": round(1000 * statistics.median(row["steps"]), 2),
             "mean_draft_ms": round(1000 * statistics.mean(row["draft"]), 2) if row["draft"] else 0.0,
             "p_accept_ge_depth": per_depth}
        report["methods"][name] = m
        print(f"{name:14s} {m['tokens_per_step']:8.2f} {m['speed_vs_ar']:8.2f} {m['median_step_ms']:8.1f} "
              f"{m['mean_draft_ms']:8.1f}  {per_depth}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
