"""Prefill in padded groups against each row alone (``LlamaModel.rows_alone_in_prefill``, which bf16 and ``gguf-q8``
take): the first ``--prompts`` Alpaca training prompts as one batch, the two ways taking turns; median of
``--repeats`` (seconds).

    python benchmarks/prefill_rows.py --dtypes gguf-q8,bfloat16 --prompts 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from propd.decoder import Decoder
from propd.models.llama import LlamaModel
from propd.models.loading import load_model
from propd.training.data import find_train_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="gguf-q8,bfloat16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with open(find_train_dir() / "eagle_alpaca" / "question.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["turns"][0] for line in f][: args.prompts]
    for dtype in args.dtypes.split(","):
        lm = load_model("smollm2-135m-instruct", dtype=dtype)
        ids = Decoder(lm, preset="ar").encode(texts)
        m = lm.model
        times = {"groups": [], "rows alone": []}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for way, alone in (("groups", False), ("rows alone", True)):
                    m.rows_alone_in_prefill = (lambda alone=alone: alone)  # this instance only
                    t = time.perf_counter()
                    m.prefill(m.new_cache(len(ids), max(map(len, ids)) + 8), ids)
                    times[way].append(time.perf_counter() - t)
        del m.rows_alone_in_prefill
        print(f"{dtype}: {len(ids)} prompts, {sum(map(len, ids))} tokens; "
              + ", ".join(f"{way} {statistics.median(v):.3f} s" for way, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
