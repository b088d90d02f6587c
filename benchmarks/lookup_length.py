"""Prompt lookup's draft length at long contexts: how many of a match's continuation tokens are worth verifying, on
task requests over long documents built from held-out training prompts (nothing here is tuned on Spec-Bench).

Each document joins the model's greedy answers to ``--join`` held-out prompts (``eagle_steps.held_out_prompts``),
wrapped in a task request (summarize, extract, translate, ...: ``propd.training.data.TASKS``), so contexts run to
several hundred tokens as in summarization and retrieval-augmented answering. ``--documents awesome`` takes
human-written documents instead: awesome-chatgpt-prompts TEXT rows of at least ``--doc-chars`` characters, cut there
(the model copies less from them than from its own answers). Methods take turns request by request:
``ar``; ``prompt-lookup`` with each option set in ``--variants``, in a chain of its ``max_tokens`` nodes;
``propd-lookup``. Needs the lookup plugin: ``pip install -e plugins/propd-lookup``.

    python benchmarks/lookup_length.py --requests 8 --join 3    # about 6 minutes on 2 CPU cores

Prints tokens per step (per row), nodes per step, step time and speed over ``ar`` (decoding steps only), and per
variant how many draft tokens each drafting step accepted. ``--batch B --max-rows 0,32,64`` decodes B requests
together with each variant's tree cut to at most that many token rows per step (``static:max_rows``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eagle_steps import held_out_prompts, print_turns, take_turns  # noqa: E402

from propd.decoder import Decoder  # noqa: E402
from propd.models.loading import load_model, shipped_heads  # noqa: E402
from propd.presets import parse_component  # noqa: E402
from propd.training.data import TASKS, awesome_texts, find_train_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "propd-lookup"))
from propd_lookup import LookupConfig  # noqa: E402

# the ``lookup`` preset's former drafts (transformers' prompt_lookup_num_tokens=10), shorter chains, and branches as
# long as 1-2 times the matched ids (``length_factor``)
VARIANTS = ("max_tokens=10", "max_tokens=4,min_ngram=2", "max_tokens=6",
            "max_ngram=8,length_factor=1,max_tokens=10", "max_ngram=8,length_factor=1.5,max_tokens=10",
            "max_ngram=8,length_factor=2,max_tokens=10", "max_ngram=8,length_factor=1.5,max_tokens=16",
            "max_ngram=8,length_factor=2,max_tokens=16")


def task_requests(lm, n: int, join: int, skip: int = 0) -> list[str]:
    """``n`` task requests, each over a document joining the model's greedy answers to ``join`` held-out prompts
    (after the first ``skip`` requests' prompts)."""
    prompts = held_out_prompts(shipped_heads("smollm2-135m-instruct") / "eagle", (skip + n) * join)[skip * join:]
    answers = Decoder(lm, preset="ar").generate(prompts, max_new_tokens=160, batch_size=8).texts
    docs = ["\n\n".join(a.strip() for a in answers[i:i + join]) for i in range(0, len(answers), join)]
    return [TASKS[i % len(TASKS)].format(text=d) for i, d in enumerate(docs)]


def awesome_requests(n: int, chars: int, skip: int = 0) -> list[str]:
    """``n`` task requests over human-written documents: the awesome-chatgpt-prompts TEXT rows of at least ``chars``
    characters, in file order after the first ``skip``, each cut to ``chars`` characters."""
    docs = [t[:chars] for t in awesome_texts(find_train_dir()) if len(t) >= chars][skip:skip + n]
    return [TASKS[(skip + i) % len(TASKS)].format(text=d) for i, d in enumerate(docs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--join", type=int, default=3, help="answers joined into each request's document")
    ap.add_argument("--skip", type=int, default=0, help="start after this many requests' prompts (another sample)")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--documents", choices=("answers", "awesome"), default="answers",
                    help="the documents: the model's answers to held-out prompts, or human-written prompt texts")
    ap.add_argument("--doc-chars", type=int, default=2500, help="--documents awesome: characters per document")
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help="';'-separated prompt-lookup options to compare, each in a chain of max_tokens nodes")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sizers", default="",
                    help="';'-separated propd-dynamic options, each run with prompt-lookup's defaults beside "
                         "propd-lookup (e.g. 'max_depth=10,sizes=[1,3,5,8,11]')")
    ap.add_argument("--batch", type=int, default=1, help="requests decoded together (batches taking turns)")
    ap.add_argument("--max-rows", default="0", help="comma-separated static:max_rows caps, each variant run under each")
    args = ap.parse_args()
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)
    requests = (task_requests(lm, args.requests, args.join, args.skip) if args.documents == "answers" else
                awesome_requests(args.requests, args.doc_chars, args.skip))
    runs = {"ar": Decoder(lm, preset="ar")}
    caps = [int(c) for c in args.max_rows.split(",")]
    for opts in args.variants.split(";"):
        L = LookupConfig(**parse_component(f"x:{opts}")[1]).max_tokens
        for cap in caps:
            runs[opts + (f" rows<={cap}" if cap else "")] = Decoder(
                lm, preset=None, sizer=f"static:tree=chain:{L},max_rows={cap}", proposer=f"prompt-lookup:{opts}")
    runs["propd-lookup"] = Decoder(lm, preset="propd-lookup")
    for opts in filter(None, args.sizers.split(";")):
        runs[f"propd-dynamic:{opts}"] = Decoder(lm, preset=None, sizer=f"propd-dynamic:{opts}",
                                                proposer="prompt-lookup")
    rows = take_turns(runs, requests, args.max_new, args.batch)
    context = [len(ids) for ids in runs["ar"].encode(requests)]
    print(f"{len(requests)} requests, prompts of {min(context)}-{max(context)} tokens (median "
          f"{statistics.median(context):.0f}), {args.max_new} new tokens, {args.dtype}, batches of {args.batch}")
    print_turns(rows)
    for name in runs if args.batch == 1 else ():
        if name == "ar" or name.startswith("propd-"):
            continue
        drafted = [a - 1 for a, n in zip(rows[name]["accepted"], rows[name]["nodes"]) if n > 1]
        hist = collections.Counter(drafted)
        print(f"{name}: {len(drafted)} of {len(rows[name]['nodes'])} steps drafted; draft tokens accepted: "
              + ", ".join(f"{k}: {hist[k]}" for k in sorted(hist)))


if __name__ == "__main__":
    main()
