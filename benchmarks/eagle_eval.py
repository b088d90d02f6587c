"""Validation accuracy of saved EAGLE drafters on one training run's held-out prompts, side by side.

Each drafter is read from its directory (as shipped: bf16 weights, its own draft vocabulary) and scored with the
trainer's ``evaluate`` on the first answers of RUN's validation prompts, from RUN's cached hidden states: top-k of the
first guess (teacher-forced features) and ``step2_top1``, the second step's top-1 when it reads the drafter's own
first feature (docs/heads.md). Timing-free; a minute or two on 2 CPU cores.

    python benchmarks/eagle_eval.py --run out/eagle-fu1 propd/heads/smollm2-135m-instruct/eagle out/eagle-fu1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import attrs
import torch

from propd.models.eagle import EagleDrafter
from propd.models.loading import load_model
from propd.training.eagle import EagleTrainConfig, _features, draft_projection, evaluate
from propd.training.hidden import FeatureStore
from propd.training.trainer import _answers, _val_seqs, training_prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished train-heads --kind eagle output directory")
    ap.add_argument("drafters", nargs="+", help="drafter directories to score")
    args = ap.parse_args()
    run = Path(args.run)
    cfg = EagleTrainConfig(**json.loads((run / "report.json").read_text())["config"])
    model = load_model(cfg.model, dtype="float32", heads="none")
    quiet = lambda m: None  # noqa: E731 (everything below is read from RUN's cache)
    decoder, prompt_ids = training_prompt_ids(model, cfg)
    answers = _answers(decoder, prompt_ids, cfg, run / "work", quiet)
    feats = _features(model, prompt_ids, answers, FeatureStore(run / "work" / "hidden"), quiet)
    val = sorted(i for i in _val_seqs(len(prompt_ids), cfg) if len(answers[i]) > 1)
    m = model.model
    for d in args.drafters:
        drafter = EagleDrafter.load(d, m.cfg).attach(m)
        ids = drafter.draft_ids if drafter.draft_ids is not None else torch.arange(m.cfg.vocab_size)
        w_draft, to_draft = draft_projection(m, ids)
        v = evaluate(drafter, feats, val, w_draft, to_draft, attrs.evolve(cfg, ttt_steps=1))
        print(json.dumps({"drafter": d, **v}), flush=True)


if __name__ == "__main__":
    main()
