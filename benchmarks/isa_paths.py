"""The linear kernel's AVX-512 paths (AVX-512F; AVX512-BF16 for bf16 weights) against its AVX2 path, on whole
forward passes of the default model.

Times a decoding step of T tree nodes (a 300-token context, batch 1) with the extension's AVX-512 path and with its
AVX2 path, alternating the two pass by pass so that the machine's drift slows both alike, in float32 and bfloat16;
prints the median milliseconds and their ratio. Both paths give the same results bit for bit
(tests/models/test_cpu_kernel.py); on a CPU without AVX-512F there is one path and nothing to compare.

    python benchmarks/isa_paths.py          # about 2 minutes on 2 CPU cores
"""

import time

import torch

from propd.models import cpu_kernel
from propd.models.loading import load_model

SIZES = (1, 2, 4, 8, 16, 32, 64)


def step_times(dtype: str, reps: int = 15) -> None:
    ext = cpu_kernel.extension()
    models, caches = {}, {}
    for limit in (0, 1):  # weights are packed for the path in force when they are packed (bf16 pairs or not)
        ext.set_isa_limit(limit)
        m = models[limit] = load_model("smollm2-135m-instruct", dtype=dtype).model
        m.prepare()
        caches[limit] = m.new_cache(1, 600)
        m.prefill(caches[limit], [list(range(100, 400))])
    res: dict[tuple[int, int], list[float]] = {}
    for _ in range(reps):
        for T in SIZES:
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
            node_idx, tok = torch.arange(T).expand(1, T), torch.randint(0, 49000, (1, T))
            for limit in (0, 1):
                ext.set_isa_limit(limit)
                m, cache = models[limit], caches[limit]
                t = time.perf_counter()
                a = m.attention_inputs(cache, node_idx, mask, torch.arange(T))
                m.logits(m.norm(m.run_layers(m.embed(tok), 0, m.num_layers, cache, a)))
                res.setdefault((T, limit), []).append(time.perf_counter() - t)
    ext.set_isa_limit(0)
    med = {k: sorted(v)[reps // 2] * 1000 for k, v in res.items()}
    ext.set_isa_limit(0)
    print(f"{dtype}: nodes, {ext.isa()} ms, avx2 ms, ratio (median of {reps} alternating passes)")
    for T in SIZES:
        print(f"{T:5d} {med[(T, 0)]:9.1f} {med[(T, 1)]:9.1f} {med[(T, 0)] / med[(T, 1)]:9.2f}")


if __name__ == "__main__":
    if cpu_kernel.extension() is None or not cpu_kernel.extension().isa().startswith("avx512"):
        raise SystemExit(f"this CPU runs the kernel on {cpu_kernel.isa()}: no AVX-512 path to compare")
    with torch.inference_mode():
        for dtype in ("float32", "bfloat16"):
            step_times(dtype)
