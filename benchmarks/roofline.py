"""Each decoding step size's time against its floor on this machine (issue: CPU engine at the memory floor).

Measures, in one run: the memory streaming bandwidth (a sum over a 1 GiB float32 buffer, best of 5), the peak
float32 and bfloat16 multiply-add rates (torch's large square matrix products, best of 5; MKL/oneDNN use the widest
units the CPU has; propd's kernel on a weight that stays in cache where that is faster), and the time of a decoding step of T tree nodes (default model, 300-token context, batch 1,
median of 9), in float32, bfloat16 and ``gguf`` (the model file's Q4_1/Q8_0 blocks, dequantized in registers). A step's floor is max(weight bytes / bandwidth, 2 x parameters x T / peak rate); the ratio says how far
the step is from it.

    python benchmarks/roofline.py            # about a minute on 2 CPU cores
"""

import time

import torch

from propd.models import cpu_kernel
from propd.models.loading import load_model

SIZES = (1, 2, 4, 8, 16, 32, 64)


def best(fn, reps=5) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth() -> float:
    buf = torch.ones(2**28)  # 1 GiB
    return buf.numel() * 4 / best(lambda: buf.sum())


def peak(dtype: torch.dtype, n: int = 2048) -> float:
    """The faster of torch's large square product and propd's own kernel on a cache-resident weight (torch's MKL
    may not use a CPU's widest units, e.g. AVX-512 on AMD)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    rate = 2 * n**3 / best(lambda: a @ b)
    from propd.models import cpu_kernel

    if cpu_kernel.extension() is not None:
        w, x = torch.randn(1024, 1024).to(dtype), torch.randn(48, 1024).to(dtype)
        packed = cpu_kernel.pack(w)

        def calls():
            for _ in range(20):
                cpu_kernel.linear(x, packed, 1024)

        calls()
        rate = max(rate, 20 * 2 * 48 * 1024 * 1024 / best(calls))
    return rate


def step_floor(dtype: str, bw: float, rate: float, reps: int = 9) -> None:
    lm = load_model("smollm2-135m-instruct", dtype=dtype)
    m = lm.model
    m.prepare()
    from propd.models.quant import QuantLinear

    linears = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Linear, QuantLinear))]
    params = nbytes = 0
    seen = set()
    for lin in linears:
        if isinstance(lin, QuantLinear):  # GGUF blocks: the packed bytes are what a step streams
            params += lin.in_features * lin.out_features
            nbytes += lin.packed.numel()
        elif id(lin.weight) not in seen:
            seen.add(id(lin.weight))
            params += lin.weight.numel()
            nbytes += lin.weight.numel() * lin.weight.element_size()
    cache = m.new_cache(1, 600)
    m.prefill(cache, [list(range(100, 400))])
    print(f"{dtype}: {params / 1e6:.0f}M matrix parameters, {nbytes / 2**20:.0f} MiB streamed per step")
    print(" nodes   step ms  floor ms  (memory, compute)  step / floor")
    for T in SIZES:
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        node_idx, tok = torch.arange(T).expand(1, T), torch.randint(0, 49000, (1, T))

        def step():
            a = m.attention_inputs(cache, node_idx, mask, torch.arange(T))
            m.logits(m.norm(m.run_layers(m.embed(tok), 0, m.num_layers, cache, a)))

        step()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        took = sorted(times)[reps // 2]
        mem, comp = nbytes / bw, 2 * params * T / rate
        print(f"{T:6d} {took * 1e3:9.1f} {max(mem, comp) * 1e3:9.1f}  ({mem * 1e3:6.1f}, {comp * 1e3:6.1f})"
              f"  {took / max(mem, comp):9.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    with torch.inference_mode():
        bw = bandwidth()
        f32, b16 = peak(torch.float32), peak(torch.bfloat16)
        print(f"streaming bandwidth {bw / 1e9:.1f} GB/s; peak float32 {f32 / 1e9:.0f} GFLOP/s, bfloat16 "
              f"{b16 / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
        step_floor("float32", bw, f32)
        step_floor("bfloat16", bw, max(f32, b16))
        if cpu_kernel.extension() is not None:  # the GGUF file's Q4_1/Q8_0 blocks (float32 arithmetic)
            step_floor("gguf", bw, f32)
