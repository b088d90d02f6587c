"""What a draft vocabulary saves: the Medusa heads' guesses over N frequent tokens vs the whole vocabulary.

Times ``MedusaHeads.topk`` (the heads' ResBlocks, the vocabulary projection and the top-k) on the default model with
its shipped heads, for the hidden states of 1, 4 and 16 batch rows, with the whole vocabulary and with the N most
frequent tokens of the heads' ``draft_vocab.json``, alternating the forms, and prints medians (docs/heads.md).

    python benchmarks/draft_vocab.py              # float32; about 30 seconds on 2 CPU cores
    python benchmarks/draft_vocab.py bfloat16
"""

import statistics
import sys
import time

import torch

from propd.models.loading import load_model


def main(dtype: str = "float32", rows=(1, 4, 16), repeats: int = 40) -> None:
    model = load_model("smollm2-135m-instruct", dtype=dtype)
    heads = model.heads
    have = heads.draft_size()
    sizes = [0] + [n for n in (4096, 8192, 16384) if n < have] + [have]
    print(f"{dtype}, {torch.get_num_threads()} threads; draft_vocab.json lists {have} tokens; "
          f"K = {heads.num_heads} heads; median ms of {repeats} calls")
    print("rows | " + " | ".join("whole vocab" if n == 0 else f"N={n}" for n in sizes))
    with torch.inference_mode():
        for b in rows:
            h = torch.randn(b, model.config.hidden_size, dtype=heads.heads[0][0].linear.weight.dtype)
            times = {n: [] for n in sizes}
            for n in sizes:
                heads.topk(h, 16, draft_vocab=n)  # warm-up (and the one-off gather of the rows)
            for _ in range(repeats):
                for n in sizes:
                    t = time.perf_counter()
                    heads.topk(h, 16, draft_vocab=n)
                    times[n].append(time.perf_counter() - t)
            print(f"{b:4d} | " + " | ".join(f"{statistics.median(times[n]) * 1e3:.2f}" for n in sizes))


if __name__ == "__main__":
    main(*sys.argv[1:2])
