"""EAGLE drafters side by side on training prompts that none of them trained on: accepted tokens per step of
``eagle`` trees at batch 1, as plain prompts and as task requests around the model's own answers to them (``--tasks``
of ``benchmarks/eagle_steps.py``). Timing-free (float32); a way to choose between drafters without the benchmark.

A prompt is held out of a run when its run's ``report.json`` config puts it in the validation split or beyond its
``--max-prompts``; requests the model wrote itself (``--self-prompts``) are not from ``shared/data/train``.

    python benchmarks/eagle_compare.py propd/heads/smollm2-135m-instruct/eagle out/eagle-sp --prompts 24
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.strategies.eagle import EagleConfig, EagleProposer
from propd.training.data import TASKS, training_prompts
from propd.training.eagle import EagleTrainConfig
from propd.training.trainer import _val_seqs, training_prompt_texts


def trained_on(run: Path) -> set[str]:
    """The training prompts (text) a drafter's run trained on, from its ``report.json``."""
    saved = json.loads((run / "report.json").read_text())["config"]
    cfg = EagleTrainConfig(**saved)
    prompts = training_prompt_texts(cfg)
    val = _val_seqs(len(prompts), cfg)
    return {p for i, p in enumerate(prompts) if i not in val}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("drafters", nargs="+", help="EAGLE drafter directories (each with its run's report.json)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--trees", default="3,4", help="tree sizes N (root included), depth N - 1, top-k 4")
    args = ap.parse_args()
    seen = set().union(*(trained_on(Path(d)) for d in args.drafters))
    prompts = [p for p in training_prompts(json.loads((Path(args.drafters[0]) / "report.json").read_text())
                                           ["config"].get("data") or _default_data())
               if p not in seen][: args.prompts]
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    answers = Decoder(lm, preset="ar").generate(prompts, max_new_tokens=128).texts
    tasks = [TASKS[i % len(TASKS)].format(text=a.strip() or "...") for i, a in enumerate(answers)]
    print(f"{len(prompts)} prompts held out of every run; accepted tokens per step (plain | task requests)")
    for d in args.drafters:
        lm.load_drafter(d)
        cells = []
        for kind, ps in (("plain", prompts), ("tasks", tasks)):
            for n in (int(x) for x in args.trees.split(",")):
                dec = Decoder(lm, preset=None, sizer=f"static:tree=budget:{n}:{n - 1}",
                              proposer=EagleProposer(EagleConfig(top_k=4, depth=4)))
                acc = [s.accepted[0] for p in ps for s in dec.generate([p], max_new_tokens=args.max_new).stats]
                cells.append(f"{kind} N={n}: {sum(acc) / len(acc):.3f}")
        print(f"{d}: {', '.join(cells)}", flush=True)


def _default_data() -> str:
    from propd.training.data import find_train_dir

    return str(find_train_dir())


if __name__ == "__main__":
    main()
