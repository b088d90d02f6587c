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
import sys
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).parent))
from eagle_data_ab import accepted_per_step  # noqa: E402

from propd.decoder import Decoder  # noqa: E402
from propd.models.loading import load_model  # noqa: E402
from propd.training.data import TASKS  # noqa: E402
from propd.training.eagle import EagleTrainConfig  # noqa: E402
from propd.training.trainer import _val_seqs, training_prompt_texts  # noqa: E402


def run_config(run: Path) -> EagleTrainConfig:
    """The training config in a drafter's ``report.json``."""
    return EagleTrainConfig(**json.loads((run / "report.json").read_text())["config"])


def trained_on(cfg: EagleTrainConfig) -> set[str]:
    """The training prompts (text) a run with config ``cfg`` trained on."""
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
    configs = [run_config(Path(d)) for d in args.drafters]
    seen = set().union(*(trained_on(c) for c in configs))
    every = training_prompt_texts(attrs.evolve(configs[0], max_prompts=None))  # the first run's data, in its order
    prompts = [p for p in every if p not in seen][: args.prompts]
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    answers = Decoder(lm, preset="ar").generate(prompts, max_new_tokens=128).texts
    tasks = [TASKS[i % len(TASKS)].format(text=a.strip() or "...") for i, a in enumerate(answers)]
    print(f"{len(prompts)} prompts held out of every run; accepted tokens per step (plain | task requests)")
    for d in args.drafters:
        lm.load_drafter(d)
        sizes = [int(x) for x in args.trees.split(",")]
        cells = [f"{kind} N={n}: {accepted_per_step(lm, ps, n, args.max_new)[0]:.3f}"
                 for kind, ps in (("plain", prompts), ("tasks", tasks)) for n in sizes]
        print(f"{d}: {', '.join(cells)}", flush=True)


if __name__ == "__main__":
    main()
