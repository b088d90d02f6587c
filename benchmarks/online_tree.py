"""Does the dynamic sizer build worse trees than Medusa's offline heuristic? (docs/propd.md, "Goals", reason 3)

Learns `propd-dynamic`'s online acceptance estimates by decoding the first 6 held-out training prompts
(out/ho800/question.jsonl, made as docs/heads.md says) with `propd-dynamic-only`, then decodes the next 12 with
fixed 4- and 8-node trees: the sizer's best trees from those estimates, and `medusa-heuristic`'s from the heads'
report.json. Prints each tree and its mean accepted tokens per step (timing-free). fp32, batch 1, 32 new tokens.

    python benchmarks/online_tree.py      # about 2 minutes on 2 CPU cores
"""

import json
import statistics

from propd.decoder import Decoder
from propd.hookspecs import hookimpl
from propd.models.loading import load_model
from propd.tree import best_tree, rank_probabilities
from propd.tree import DraftTree

lm = load_model("smollm2-135m-instruct", dtype="float32")
qs = [json.loads(line)["turns"][0] for line in open("out/ho800/question.jsonl")]
learn, test = qs[:6], qs[6:18]


class FixedTree:
    def __init__(self, paths):
        self.paths, self.tree = paths, None

    @hookimpl
    def propd_tree(self, ctx):
        if self.tree is None:
            self.tree = DraftTree.from_paths(self.paths, device=ctx.device)
        return self.tree


def accepted(sizer) -> float:
    dec = Decoder(lm, preset="medusa", sizer=sizer)
    steps = [sum(s.accepted) for q in test for s in dec.generate([q], max_new_tokens=32).stats]
    return statistics.mean(steps)


online = Decoder(lm, preset="propd-dynamic-only")
sizer = next(obj for role, obj in online.components if role == "sizer")
for q in learn:
    online.generate([q], max_new_tokens=48)
for n in (4, 8):
    paths = best_tree(rank_probabilities(sizer.P), n)[0]
    print(f"{n} nodes, online:  {paths}  accepted {accepted(FixedTree(paths)):.3f}")
    offline = Decoder(lm, preset="medusa", sizer=f"medusa-heuristic:size={n}")
    paths = next(obj for role, obj in offline.components if role == "sizer").paths
    print(f"{n} nodes, offline: {paths}  accepted {accepted(f'medusa-heuristic:size={n}'):.3f}")
