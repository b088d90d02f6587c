"""Step time of fixed small trees with and without propd's packed CPU kernel (docs/propd.md, "Goals").

Decodes the first 4 held-out training prompts (out/ho800/question.jsonl, made as docs/heads.md says) with `ar` and
Medusa trees of 2 to 32 nodes (`medusa-heuristic:size=N`), twice, the packed product kernel (1-128 rows) and MKL's
products taking turns prompt by prompt (with MKL, the layers run module by module; the extension's other ops stay on),
and prints the median step time and mean accepted tokens per step of each. fp32, batch 1.

    python benchmarks/tree_steps.py      # about 6 minutes on 2 CPU cores
"""

import json
import statistics

from propd.decoder import Decoder
from propd.models import cpu_kernel
from propd.models.loading import load_model

lm = load_model("smollm2-135m-instruct", dtype="float32")
qs = [json.loads(l)["turns"][0] for l in open("out/ho800/question.jsonl")][:4]
decs = {"ar": Decoder(lm, preset="ar")}
for n in (2, 4, 8, 16, 32):
    decs[f"h{n}"] = Decoder(lm, preset="medusa", sizer=f"medusa-heuristic:size={n}")
res = {}
ON = cpu_kernel.MAX_ROWS
for rep in range(2):
    for q in qs:
        for kern in (ON, 0):
            cpu_kernel.MAX_ROWS = kern
            for name, d in decs.items():
                r = d.generate([q], max_new_tokens=32)
                res.setdefault((name, kern), []).extend(s.step_time_s * 1000 for s in r.stats)
                res.setdefault((name, kern, "acc"), []).extend(sum(s.accepted) for s in r.stats)
for kern in (ON, 0):
    print("kernel" if kern else "MKL   ", "  ".join(f"{n}: {statistics.median(res[(n, kern)]):.1f} ms acc {statistics.mean(res[(n, kern, 'acc')]):.2f}" for n in decs))
