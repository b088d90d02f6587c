"""Do task requests around the model's own answers (``train-heads --kind eagle --tasks K``) lift the EAGLE drafter on
requests that hand it a long text? (docs/heads.md, "Requests that hand the model a text".)

Two small drafters, each ``train_eagle`` on the first 320 awesome-chatgpt prompts only (64-token answers, 6 epochs,
seed 0): A on the answers alone, T also on one task request per prompt (``data.TASKS``: the i-th prompt's answer
wrapped in request i mod 8). Then the accepted tokens per step of ``eagle`` trees of N = 3 and 4 nodes (depth N - 1,
top-k 4, float32, 64 new tokens) on the first 10 vicuna-bench and 10 Alpaca prompts of ``train/`` (plain), which
neither trained on, and on 20 task requests wrapping the model's 96-token answers to those prompts (tasks).
Timing-free; about 25 minutes on 2 CPU cores; each stage resumes from its cache.

    python benchmarks/eagle_tasks_ab.py OUT
"""

import sys
from pathlib import Path

from eagle_data_ab import awesome_only, start_from, unseen_prompts
from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.strategies.eagle import EagleConfig, EagleProposer
from propd.training.data import TASKS
from propd.training.eagle import EagleTrainConfig, train_eagle

root = Path(sys.argv[1] if len(sys.argv) > 1 else "out/eagle-tasks-ab")
common = dict(model="smollm2-135m-instruct", data=str(awesome_only(root)), max_prompts=320, max_new_tokens=64,
              epochs=6, seed=0)
train_eagle(EagleTrainConfig(out=str(root / "A"), **common))
start_from(root, "A", "T")  # T starts from A's answers and hidden states
train_eagle(EagleTrainConfig(out=str(root / "T"), tasks=1, **common))

prompts = unseen_prompts()
lm = load_model("smollm2-135m-instruct", dtype="float32")
answers = Decoder(lm, preset="ar").generate(prompts, max_new_tokens=96).texts
sets = {"plain": prompts, "tasks": [TASKS[i % len(TASKS)].format(text=a.strip()) for i, a in enumerate(answers)]}
for name in ("A", "T"):
    lm.load_drafter(root / name)
    for n in (3, 4):
        dec = Decoder(lm, preset=None, sizer=f"static:tree=budget:{n}:{n - 1}",
                      proposer=EagleProposer(EagleConfig(top_k=4, depth=4)))
        for label, ps in sets.items():
            acc = [s.accepted[0] for p in ps for s in dec.generate([p], max_new_tokens=64).stats]
            print(f"{name} {label} N={n}: {sum(acc) / len(acc):.3f} accepted tokens per step over {len(acc)} steps",
                  flush=True)
