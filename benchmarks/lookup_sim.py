"""Prompt-lookup draft policies replayed offline: exact accepted tokens, modelled step time.

Greedy decoding is lossless, so a lookup decoder's steps on a request are fixed by ``ar``'s answer: at each step the
history is prompt + answer so far, the proposer's matches (``propd_lookup.host_continuations``, the plugin's own
search) are merged into a trie of at most ``max_tokens`` + 1 nodes as the ``lookup`` preset's budget allows, and the
step accepts the longest branch that agrees with the answer, plus one. Replaying ``ar``'s answers under each option set
of ``--variants`` gives each policy's accepted tokens and nodes per step exactly, in seconds, where decoding them would
take minutes per policy and its timings would carry this shared machine's noise.

The time is modelled, not measured: a step of T nodes costs ``1 + (--step-overhead) + (--node-cost) * (T - 1)`` AR
steps, and ``(--steep)`` more per node above ``--steep-from`` nodes (where the products stop being bound by streaming
the weights). The defaults are a 2-core AVX2 machine's at 500-800-token contexts (docs/lab/2026-12-06-lookup-sim.md):
give another machine's figures (``python benchmarks/step_times.py --presets ar,lookup --category ...``, or
``--nodes``) to rank the policies there.

    python benchmarks/lookup_sim.py --requests 24 --join 3     # generates the answers once (a few minutes), cached

The requests are training data only, as in ``benchmarks/lookup_length.py``: task requests over the model's answers to
held-out training prompts (``--documents answers``) and over human-written texts (``awesome``); Spec-Bench is never
read. Prints, per policy and request set, accepted tokens and nodes per step and the modelled decode-only speed over
``ar``; each half of the requests separately, so a policy's lead can be checked for consistency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lookup_length import awesome_requests, task_requests  # noqa: E402

from propd.decoder import Decoder  # noqa: E402
from propd.models.loading import load_model  # noqa: E402
from propd.presets import parse_component  # noqa: E402
from propd.tree import TrieRows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "propd-lookup"))
from propd_lookup import LookupConfig, host_continuations  # noqa: E402

VARIANTS = ("", "min_ngram=2", "max_matches=1", "max_matches=2", "length_factor=1", "length_factor=2",
            "max_tokens=12,length_factor=2", "max_tokens=16,length_factor=2",
            "max_matches=2,max_tokens=12,length_factor=2")


def answers(path: Path, n: int, join: int, max_new: int) -> list[dict]:
    """Prompt ids and ``ar``'s answer ids for ``n`` requests of each kind, cached in ``path`` (JSON lines)."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if len(rows) == 2 * n and all(len(r["answer"]) <= max_new for r in rows):
            return rows
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    reqs = [("answers", r) for r in task_requests(lm, n, join)] + [("awesome", r) for r in awesome_requests(n, 2500)]
    dec = Decoder(lm, preset="ar")
    ids = dec.encode([r for _, r in reqs])
    out = dec.generate_ids(ids, max_new_tokens=max_new, batch_size=8).token_ids
    rows = [{"kind": k, "prompt": list(p), "answer": o} for (k, _), p, o in zip(reqs, ids, out)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def replay(rows: list[dict], cfg: LookupConfig) -> tuple[list[int], list[int]]:
    """Accepted tokens and nodes of every step a ``lookup`` decoder with ``cfg`` takes on ``rows``' answers: the
    plugin's matches in the proposer's ``TrieRows`` (budget ``max_tokens`` + 1), verified greedily against the
    answer."""
    accepted, nodes = [], []
    for r in rows:
        full, P, ans = r["prompt"] + r["answer"], len(r["prompt"]), r["answer"]
        i = 0  # the step's root is ans[i]
        while i < len(ans) - 1:
            trie = TrieRows([ans[i]], cfg.max_tokens + 1)
            for seq in host_continuations(torch.tensor([full[: P + i + 1]]), torch.tensor([P + i + 1]), cfg)[0]:
                trie.add_sequence(0, seq)
            tokens, parents = trie.tokens[0], trie.parents[0]
            truth, node, a = ans[i + 1:], 0, 0
            while a < len(truth):  # the child of the last accepted node that guessed the next token
                node = next((j for j in range(1, len(tokens)) if parents[j] == node and tokens[j] == truth[a]), None)
                if node is None:
                    break
                a += 1
            a = min(a + 1, len(truth))  # the bonus token too, within the answer's length
            accepted.append(a)
            nodes.append(len(tokens))
            i += a
    return accepted, nodes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24, help="requests of each kind")
    ap.add_argument("--join", type=int, default=3, help="answers joined into each --documents answers request")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=Path("out/lookup-sim/answers.jsonl"))
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help="';'-separated prompt-lookup options ('' = the defaults)")
    ap.add_argument("--step-overhead", type=float, default=0.04,
                    help="a lookup step's cost over an AR step's, in AR steps")
    ap.add_argument("--node-cost", type=float, default=0.05, help="each node after the root, in AR steps")
    ap.add_argument("--steep", type=float, default=0.06,
                    help="each node above --steep-from, in AR steps, on top")
    ap.add_argument("--steep-from", type=int, default=11)
    args = ap.parse_args()
    rows = answers(args.cache, args.requests, args.join, args.max_new)
    cost = lambda T: 1 + args.step_overhead + args.node_cost * (T - 1) + args.steep * max(0, T - args.steep_from)
    sets = {}
    for kind in ("answers", "awesome"):
        part = [r for r in rows if r["kind"] == kind]
        sets[f"{kind} 1st half"], sets[f"{kind} 2nd half"] = part[: len(part) // 2], part[len(part) // 2:]
    ctx = sorted(len(r["prompt"]) for r in rows)
    print(f"{len(rows)} requests, prompts of {ctx[0]}-{ctx[-1]} tokens (median {ctx[len(ctx) // 2]}), "
          f"{args.max_new} new tokens; step cost 1 + {args.step_overhead} + {args.node_cost} (T - 1) "
          f"+ {args.steep} max(0, T - {args.steep_from}) AR steps")
    print("| options | " + " | ".join(sets) + " |")
    print("|---" * (len(sets) + 1) + "|")
    for opts in args.variants.split(";"):
        cfg = LookupConfig(**(parse_component(f"x:{opts}")[1] if opts else {}))
        cells = []
        for part in sets.values():
            accepted, nodes = replay(part, cfg)
            ar_steps = sum(len(r["answer"]) - 1 for r in part)
            speed = ar_steps / sum(cost(T) for T in nodes)
            cells.append(f"{sum(accepted) / len(accepted):.2f} / {sum(nodes) / len(nodes):.1f} / {speed:.2f}x")
        print(f"| {opts or 'defaults'} | " + " | ".join(cells) + " |")
    print("(cells: accepted tokens per step / nodes per step / modelled decode speed over ar)")


if __name__ == "__main__":
    main()
