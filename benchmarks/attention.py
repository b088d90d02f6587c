"""Decoding-step attention: propd's CPU kernel (cpu_kernel.attention) against F.scaled_dot_product_attention.

Shapes of the default model's layers (9 query heads, 3 key heads, head size 64) for B rows of T query tokens over S
cached keys (a random mask, 70% allowed; 800 and 1,430 keys are the contexts of Spec-Bench's summarization and RAG
prompts and of longer documents); each time is the mean of 100 calls after 10 untimed ones, in microseconds,
with the output in the (B, T, Hq * D) layout the output projection takes. Also checks that the two agree. In float32
on AVX-512 a last column times the kernel without row invariance (``invariant=False``, as float32 steps call it: from
4 query tokens the causal kernel's tiles).

    python benchmarks/attention.py [float32|bfloat16]     # a few seconds

``causal`` times a prefill's causal self-attention instead (float32): ``cpu_kernel.causal_attention``
against SDPA's ``is_causal`` over a whole prompt of T tokens (and a second chunk of T / 2 tokens after T), best of 7
rounds of 5 calls, in milliseconds per layer:

    python benchmarks/attention.py causal
"""

import sys
import time

import torch
import torch.nn.functional as F

from propd.models import cpu_kernel

if cpu_kernel.extension() is None:
    sys.exit("the CPU kernel is unavailable here")


def causal() -> None:
    def best_ms(f):
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(5):
                f()
            ts.append((time.perf_counter() - t) / 5)
        return min(ts) * 1e3

    torch.manual_seed(0)
    print(f"{'T':>5} {'before':>6}  {'SDPA ms':>8} {'kernel ms':>9}  ratio")
    for T, before in ((300, 0), (700, 0), (1000, 0), (1400, 0), (2000, 0), (500, 1000)):
        S = before + T
        k, v = torch.randn(1, 3, S + 20, 64)[:, :, :S], torch.randn(1, 3, S + 20, 64)[:, :, :S]
        q = torch.randn(1, 9, T, 64)
        mask = torch.arange(S)[None, :] <= before + torch.arange(T)[:, None]

        def sdpa():
            if before == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2).reshape(1, T, 576)

        def kern():
            return cpu_kernel.causal_attention(q, k, v, 0.125)

        torch.testing.assert_close(kern(), sdpa(), rtol=1e-5, atol=1e-5)
        a, b = best_ms(sdpa), best_ms(kern)
        print(f"{T:>5} {before:>6}  {a:8.2f} {b:9.2f}  {b / a:5.2f}")


if len(sys.argv) > 1 and sys.argv[1] == "causal":
    causal()
    sys.exit(0)
dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")


def mean_us(f, n=100):
    for _ in range(10):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


torch.manual_seed(0)
tiles = dtype == torch.float32 and cpu_kernel.isa().startswith("avx512")
print(f"{'B':>3} {'T':>3} {'S':>4}  {'SDPA us':>8} {'kernel us':>9}  ratio" + ("  tiles us  ratio" if tiles else ""))
for B, T, S in ((1, 1, 200), (1, 4, 200), (1, 8, 200), (1, 16, 300), (1, 32, 250), (1, 64, 250), (4, 1, 300),
                (4, 8, 300), (4, 16, 300), (16, 1, 300), (16, 4, 300),
                (1, 1, 800), (1, 4, 800), (1, 8, 800), (1, 16, 800), (1, 1, 1430), (1, 5, 1430), (1, 8, 1430)):
    k = torch.randn(B, 3, S + 50, 64).to(dtype)[:, :, :S]  # views of a longer cache, as in decoding
    v = torch.randn(B, 3, S + 50, 64).to(dtype)[:, :, :S]
    q = torch.randn(B, 9, T, 64).to(dtype)
    m = torch.rand(B, T, S) > 0.3
    m[..., 0] = True

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None], enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, 576)

    def kern():
        return cpu_kernel.attention(q, k, v, m, 0.125)

    torch.testing.assert_close(kern().float(), sdpa().float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    a, b = mean_us(sdpa), mean_us(kern)
    line = f"{B:>3} {T:>3} {S:>4}  {a:8.0f} {b:9.0f}  {b / a:5.2f}"
    if tiles:
        def tiled():
            return cpu_kernel.attention(q, k, v, m, 0.125, invariant=False)

        torch.testing.assert_close(tiled(), sdpa(), rtol=1e-5, atol=1e-5)
        c = mean_us(tiled)
        line += f"  {c:8.0f}  {c / a:5.2f}"
    print(line)
