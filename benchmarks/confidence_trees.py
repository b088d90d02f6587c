"""Would trees shaped per step by the heads' own confidence accept more than fixed trees? (docs/propd.md, "Goals")

A fixed tree (Medusa's `mc_sim_7b_63`, or `medusa-heuristic`'s best tree of N nodes from the heads' report.json)
spends its N nodes on the same ranks every step. EAGLE-2 (Li et al. 2024, "EAGLE-2: Faster Inference of Language
Models with Dynamic Draft Trees", arXiv 2406.16858) instead takes, each step, the N nodes with the highest product
of draft probabilities along their path. This script measures what that would give Medusa heads, without timing:

1. greedy answers (48 new tokens, fp32) for held-out training prompts (20 per source after the first 800 of the
   seeded order, as docs/heads.md's out/ho800 but more of them);
2. one forward pass over prompt + answer gives, at every position t, the final hidden state; the heads' top-10
   guesses and log-probabilities for t+2..t+5 come from it, and the answer gives the true tokens;
3. a tree accepts 1 + the depth of its deepest node whose path matches the true tokens. "walk" follows decoding:
   start at the answer's first position, accept, jump to the next step's position (what `propd bench` would count);
   "all" averages over every position.

    python benchmarks/confidence_trees.py [HEADS_DIR]     # about 3 minutes on 2 CPU cores
"""

import heapq
import json
import sys
from pathlib import Path

import torch

from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.tree import best_tree, rank_probabilities
from propd.tree import tree_paths
from propd.training.data import find_train_dir, held_out_questions

RANKS, NEW = 10, 48
lm = load_model("smollm2-135m-instruct", dtype="float32", heads=sys.argv[1] if len(sys.argv) > 1 else None)
heads_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else lm.heads_path
report = json.loads((heads_dir / "report.json").read_text())
qs = [q["turns"][0] for q in held_out_questions(find_train_dir(), 800, 20)]
dec = Decoder(lm, preset="ar")
prompts = dec.encode(qs)
answers = dec.generate_ids(prompts, max_new_tokens=NEW).token_ids
D = lm.heads.num_heads

hits, logps = [], []  # per prompt: (positions, D, RANKS) bool and float
with torch.inference_mode():
    for p, a in zip(prompts, answers):
        seq = p + a
        cache = lm.model.new_cache(1, len(seq) + 2)
        h, _ = lm.model.hidden_states(cache, [seq], ())
        pos = list(range(len(p) - 1, len(seq) - 1))  # hidden state at t predicts t+1 (the root), heads t+2..
        logits, ids = lm.heads.draft_logits(h[0, pos])  # (P, D, n)
        top = logits.log_softmax(-1).topk(RANKS, dim=-1)
        toks = top.indices if ids is None else ids[top.indices]
        truth = torch.full((len(pos), D), -1, dtype=torch.long)
        for j, t in enumerate(pos):
            for d in range(D):
                if t + 2 + d < len(seq):
                    truth[j, d] = seq[t + 2 + d]
        hits.append((toks == truth[:, :, None]).tolist())
        logps.append(top.values.tolist())


def accepted(paths, hit) -> int:
    return 1 + max((len(q) for q in paths if all(hit[d][r] for d, r in enumerate(q))), default=0)


def confident(logp, size):
    """The size - 1 paths with the highest summed log-probability (best-first, so always a connected tree)."""
    heap, out = [(-logp[0][r], (r,)) for r in range(RANKS)], []
    heapq.heapify(heap)
    while heap and len(out) < size - 1:
        neg, q = heapq.heappop(heap)
        out.append(q)
        if len(q) < D:
            for r in range(RANKS):
                heapq.heappush(heap, (neg - logp[len(q)][r], q + (r,)))
    return out


def measure(tree_for):
    walk, every = [], []
    for hit, logp in zip(hits, logps):
        for j in range(len(hit)):
            every.append(accepted(tree_for(logp[j]), hit[j]))
        j = 0
        while j < len(hit):
            a = accepted(tree_for(logp[j]), hit[j])
            walk.append(a)
            j += a
    return sum(walk) / len(walk), sum(every) / len(every)


p = rank_probabilities([h["topk_curve"] for h in report["medusa_heads"]])
print(f"{len(qs)} held-out prompts, {sum(map(len, hits))} positions; accepted tokens per step, walk / all")
print("| nodes | fixed tree | by confidence |\n|---|---|---|")
for size in (2, 3, 4, 6, 8, 12, 16, 32, 64):
    fixed = list(best_tree(p, size)[0])
    fw, fa = measure(lambda _logp, fixed=fixed: fixed)
    cw, ca = measure(lambda logp, size=size: confident(logp, size))
    print(f"| {size} | {fw:.3f} / {fa:.3f} | {cw:.3f} / {ca:.3f} |", flush=True)
mc = [q for q in tree_paths("mc_sim_7b_63") if q]
mw, ma = measure(lambda _logp: mc)
print(f"| 64 (`mc_sim_7b_63`) | {mw:.3f} / {ma:.3f} | |")
