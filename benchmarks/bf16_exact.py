"""bfloat16 decoding against `ar`: how many rows differ when decoding steps of more than 16 queries go to SDPA, and
how many when every decoding step runs on the row-invariant attention kernel (``cpu_kernel.EXACT_MAX_QUERIES``), on
tiny random models; then the default model's bf16 step times under both, and its presets against `ar` on four
training prompts (docs/architecture.md, "Why the output cannot change").

    python benchmarks/bf16_exact.py        # about 3 minutes on 2 CPU cores
"""

import json
import time

import torch

from propd import Decoder, load_model
from propd.models import cpu_kernel
from propd.testing import random_prompts, tiny_model


def mismatches(limit: int) -> tuple[int, int]:
    cpu_kernel.EXACT_MAX_QUERIES = limit
    bad = total = 0
    for seed in range(6):
        m = tiny_model(seed=seed, heads=4, hidden_size=128, intermediate_size=256)
        m.model.to(torch.bfloat16)
        m.heads.to(torch.bfloat16)
        prompts = random_prompts(m, seed, [3, 29, 5, 44, 17])
        ref = [Decoder(m, preset="ar").generate_ids([p], max_new_tokens=24).token_ids[0] for p in prompts]
        for preset in ("ar", "bpd", "medusa", "propd-dynamic-only"):
            for bs in (1, 2, 5):
                out = Decoder(m, preset=preset).generate_ids(prompts, max_new_tokens=24, batch_size=bs).token_ids
                total += len(prompts)
                bad += sum(o != r for o, r in zip(out, ref))
    return bad, total


def step_times(reps: int = 11) -> None:
    m = load_model("smollm2-135m-instruct", dtype="bfloat16").model
    m.prepare()
    cache = m.new_cache(1, 600)
    m.prefill(cache, [list(range(100, 400))])
    res: dict[tuple[int, int], list[float]] = {}
    for _ in range(reps):
        for T in (8, 16, 32, 64):
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
            node_idx, tok = torch.arange(T).expand(1, T), torch.randint(0, 49000, (1, T))
            for limit in (16, 256):
                cpu_kernel.EXACT_MAX_QUERIES = limit
                t = time.perf_counter()
                a = m.attention_inputs(cache, node_idx, mask, torch.arange(T))
                m.logits(m.norm(m.run_layers(m.embed(tok), 0, m.num_layers, cache, a)))
                res.setdefault((T, limit), []).append(time.perf_counter() - t)
    for T in (8, 16, 32, 64):
        exact, sdpa = (sorted(res[(T, lim)])[reps // 2] * 1e3 for lim in (256, 16))
        print(f"{T:3d} nodes: kernel up to 256 queries {exact:.1f} ms, SDPA beyond 16 {sdpa:.1f} ms")


def default_model_presets() -> None:
    lm = load_model("smollm2-135m-instruct", dtype="bfloat16")
    qs = [json.loads(line)["turns"][0] for line in open("../shared/data/train/vicuna_bench/question.jsonl")][:4]
    ref = [Decoder(lm, preset="ar").generate([q], max_new_tokens=40).token_ids[0] for q in qs]
    for preset in ("medusa", "propd-prune-only", "propd", "bpd"):
        for bs in (1, 4):
            out = Decoder(lm, preset=preset).generate(qs, max_new_tokens=40, batch_size=bs).token_ids
            print(f"{preset} b={bs}: {sum(o == r for o, r in zip(out, ref))} of {len(qs)} equal to ar")


if __name__ == "__main__":
    with torch.inference_mode():
        for limit in (16, 256):
            bad, total = mismatches(limit)
            print(f"attention kernel up to {limit} queries in bf16 steps: {bad} of {total} rows differ from ar")
        cpu_kernel.EXACT_MAX_QUERIES = 256
        step_times()
        cpu_kernel.EXACT_MAX_QUERIES = 256
    default_model_presets()
