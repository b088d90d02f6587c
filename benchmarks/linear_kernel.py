"""Why ``propd.models.cpu_modules.KernelLinear`` picks its CPU kernels for few rows (docs/architecture.md, "Model core").

Part 1 times ``F.linear``, ``(W @ x^T)^T`` (at 1 row, of the row stacked twice), propd's packed AVX2 kernel
(:mod:`propd.models.cpu_kernel`) and, as a tried alternative that is not used, oneDNN's inner product on weights
packed once into its blocked layout, on the default model's 30 layers of projection shapes with distinct random
weights (425 MB, so they stream from memory as in a forward pass) plus its (49152 x 576) ``lm_head``. Part 2 times
whole forward passes of the default model at several tree sizes, alternating the three choices of ``Linear`` (packed
kernel, ``(W @ x^T)^T``, ``F.linear``), and prints the medians.

    python benchmarks/linear_kernel.py            # about 1 minute on 2 CPU cores
    python benchmarks/linear_kernel.py bfloat16   # part 1 only, bf16 weights, up to 1024 rows (about 5 minutes)
    python benchmarks/linear_kernel.py rows 96,128,192   # part 1 only, float32, at these row counts
"""

import sys
import time

import torch
import torch.nn.functional as F

from propd.models import cpu_kernel
from propd.models.cpu_modules import KernelLinear as Linear
from propd.models.loading import load_model

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def _two_rows(x: torch.Tensor) -> torch.Tensor:
    """One row stacked twice, as ``Linear`` does: a matrix-matrix product beats the matrix-vector one."""
    return torch.cat([x, x]) if x.shape[0] == 1 else x


def streamed_matmuls(dtype: torch.dtype = torch.float32, sizes=SIZES) -> None:
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    weights = [torch.randn(o, i, dtype=dtype) for _ in range(30) for o, i in shapes] + [torch.randn(49152, 576, dtype=dtype)]
    forms = {
        "F.linear": lambda w, p, x: F.linear(x, w),
        "(W @ x^T)^T": lambda w, p, x: (w @ _two_rows(x).t())[:, : x.shape[0]].t().contiguous(),
        "oneDNN packed": lambda w, p, x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
    }
    idx = {id(w): i for i, w in enumerate(weights)}
    ours = [cpu_kernel.pack(w) for w in weights] if dtype in cpu_kernel.DTYPES else []
    if ours and all(p is not None for p in ours):
        forms["propd packed"] = lambda w, p, x: cpu_kernel.linear(x, ours[idx[id(w)]], w.shape[0])
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
    except (RuntimeError, AttributeError) as e:  # e.g. bf16 on a CPU without AVX-512 BW/VL/DQ, or no oneDNN
        print(f"no oneDNN packing for {dtype}: {str(e).splitlines()[0]}")
        packed = [None] * len(weights)
        del forms["oneDNN packed"]
    print("rows" + "".join(f"{n:>15}" for n in forms), f"  ms (SmolLM2-135M's 30 layers of projections and lm_head, {dtype}, best of 5)")
    for m in sizes:
        xs = {w.shape[1]: torch.randn(m, w.shape[1], dtype=dtype) for w in weights}
        best = {}
        for name, fn in forms.items():
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for i, w in enumerate(weights):
                    fn(w, packed[i], xs[w.shape[1]])
                times.append(time.perf_counter() - t)
            best[name] = min(times) * 1000
        print(f"{m:4d}" + "".join(f"{best[n]:15.1f}" for n in forms))


def forward_passes(reps: int = 12) -> None:
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    m = lm.model
    m.prepare()  # the CPU kernel modules
    rows_on, packed_on = Linear.SKINNY_ROWS, cpu_kernel.MAX_ROWS
    choices = {"packed": (rows_on, packed_on), "(W@x^T)^T": (rows_on, 0), "F.linear": ((10**9, 0), 0)}
    res: dict[tuple[int, str], list[float]] = {}
    cache = m.new_cache(1, 600)
    m.prefill(cache, [list(range(100, 400))])  # a 300-token context
    for _ in range(reps):
        for T in SIZES:
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
            node_idx, tok = torch.arange(T).expand(1, T), torch.randint(0, 49000, (1, T))
            for name, (rows, packed) in choices.items():
                Linear.SKINNY_ROWS, cpu_kernel.MAX_ROWS = rows, packed
                t = time.perf_counter()
                a = m.attention_inputs(cache, node_idx, mask, torch.arange(T))
                m.logits(m.norm(m.run_layers(m.embed(tok), 0, m.num_layers, cache, a)))
                res.setdefault((T, name), []).append(time.perf_counter() - t)
    Linear.SKINNY_ROWS, cpu_kernel.MAX_ROWS = rows_on, packed_on
    print("nodes" + "".join(f"{n:>12}" for n in choices), "  ms (default model, fp32, batch 1, median of", reps,
          "alternating passes)")
    for T in SIZES:
        print(f"{T:5d}" + "".join(f"{sorted(res[(T, n)])[reps // 2] * 1000:12.1f}" for n in choices))


if __name__ == "__main__":
    with torch.inference_mode():
        if sys.argv[1:] == ["bfloat16"]:
            streamed_matmuls(torch.bfloat16, SIZES + (256, 1024))
        elif sys.argv[1:2] == ["rows"]:  # part 1 only, float32, at the given row counts
            streamed_matmuls(torch.float32, tuple(int(r) for r in sys.argv[2].split(",")))
        else:
            streamed_matmuls()
            forward_passes()
