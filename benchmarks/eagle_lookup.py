"""EAGLE drafts with a prompt-lookup match beside them (the ``composite`` proposer with per-part ``budgets``), at
batch 1, on prompts the drafter was not trained on: accepted tokens per step, verified nodes and speed over ``ar``,
for the lookup settings ``eagle+lookup`` was chosen from.

The prompts are the EAGLE drafter's validation split (``eagle_steps.held_out_prompts``), plain or, with ``--tasks``,
wrapped as task requests around the model's own answers (summarize, extract, translate, ...: text to copy from), so
nothing here is tuned on Spec-Bench. Needs the lookup plugin: ``pip install -e plugins/propd-lookup``.

    python benchmarks/eagle_lookup.py --prompts 16              # about 4 minutes on 2 CPU cores
    python benchmarks/eagle_lookup.py --prompts 8 --tasks

A variant ``L/E nN`` drafts a lookup match of the last N..3 tokens in at most L nodes (L - 1 tokens) and EAGLE's
tree in E nodes, in an (L + E - 1)-node budget; ``L/E nN or`` drafts with EAGLE only when the lookup found nothing
(``composite:later=empty``); ``xF``: the match's tokens are at most F times its length (``length_factor``, matches of
up to 8 tokens counted). Methods take turns prompt by prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eagle_steps import held_out_prompts, print_turns, take_turns  # noqa: E402

from propd.decoder import Decoder  # noqa: E402
from propd.models.loading import load_model, shipped_heads  # noqa: E402

# (L, E, min n-gram, later, factor): "empty" drafts with EAGLE only when the lookup found nothing; factor > 0: the
# match's tokens are at most factor x its length (up to 8 counted), else matches of up to 3 tokens, L - 1 tokens drafted
VARIANTS = ((5, 3, 1, "always", 0), (5, 3, 2, "always", 0), (5, 3, 3, "always", 0), (6, 3, 2, "always", 0),
            (7, 3, 2, "always", 0), (5, 4, 2, "always", 0), (5, 3, 2, "empty", 0), (7, 3, 2, "empty", 0),
            (5, 3, 2, "empty", 1.5), (7, 3, 2, "empty", 1.5), (11, 3, 2, "empty", 1.5), (11, 3, 3, "empty", 1.5),
            (11, 3, 2, "empty", 2))


def composite(lookup_nodes: int, eagle_nodes: int, min_ngram: int, later: str = "always", factor: float = 0) -> dict:
    n = 8 if factor else 3
    part = (f"prompt-lookup:max_ngram={n},min_ngram={min_ngram},max_tokens={lookup_nodes - 1},max_matches=1,"
            f"length_factor={factor}")
    return dict(preset=None, sizer=f"static:tree=budget:{lookup_nodes + eagle_nodes - 1}:2",
                proposer=("composite", {"parts": [part, "eagle:top_k=4"], "budgets": [lookup_nodes, eagle_nodes],
                                        "later": later}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", action="store_true", help="wrap each prompt's greedy answer in a task request")
    ap.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    ap.add_argument("--presets", default="eagle,lookup", help="presets beside ar and the variants")
    args = ap.parse_args()
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)
    prompts = held_out_prompts(shipped_heads("smollm2-135m-instruct") / "eagle", args.prompts)
    if args.tasks:
        from propd.training.data import TASKS

        answers = Decoder(lm, preset="ar").generate(prompts, max_new_tokens=128).texts
        prompts = [TASKS[i % len(TASKS)].format(text=a.strip() or "...") for i, a in enumerate(answers)]
    runs = {name: Decoder(lm, preset=name) for name in ["ar", *args.presets.split(",")]}
    variants = VARIANTS if args.variants is None else [VARIANTS[int(i)] for i in args.variants.split(",")]
    for lk, e, n, later, f in variants:
        name = f"{lk}/{e} n{n}" + (" or" if later == "empty" else "") + (f" x{f:g}" if f else "")
        runs[name] = Decoder(lm, **composite(lk, e, n, later, f))
    rows = take_turns(runs, prompts, args.max_new)
    kind = "task requests" if args.tasks else "plain prompts"
    print(f"{len(prompts)} {kind}, {args.max_new} new tokens, {args.dtype}")
    print_turns(rows)


if __name__ == "__main__":
    main()
