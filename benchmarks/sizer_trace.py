"""What `propd-dynamic` believes when it chooses: a trace of its estimates (docs/propd.md, "Goals", reason 3).

Decodes the first 4 held-out training prompts (out/ho800/question.jsonl, made as docs/heads.md says) with the `propd`
preset, fp32, batch 1, 64 new tokens, and prints a line at each choice: the step clock, the calibration c, the choice,
and for each candidate size up to 16 its estimated accepted tokens l(i) / step time T(i) in ms (n measurements at
this key; * marks a size priced by the regression line, not yet measured).

    python benchmarks/sizer_trace.py      # about a minute on 2 CPU cores
"""

import json

from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.strategies import dynamic

lm = load_model("smollm2-135m-instruct", dtype="float32")
qs = [json.loads(line)["turns"][0] for line in open("out/ho800/question.jsonl")][:4]
choose = dynamic.DynamicSizer.choose


def traced(self, cost, values):
    size = choose(self, cost, values)
    c = self.calibration
    cells = " ".join(f"{i}:{self._l(i, values):.2f}/{1000 * cost.estimate(i):.0f}"
                     f"{'' if cost.n.get(i, 0) else '*'}({cost.n.get(i, 0)})" for i in self.sizes if i <= 16)
    print(f"step {self.clock:4d}  c={c:.2f}  choose {size:2d} | {cells}")
    return size


dynamic.DynamicSizer.choose = traced
dec = Decoder(lm, preset="propd")
for q in qs:
    r = dec.generate([q], max_new_tokens=64)
    print(f"-- prompt done: {len(r.stats)} steps, {len(r.token_ids[0]) / r.wall_time_s:.1f} tokens/s")
