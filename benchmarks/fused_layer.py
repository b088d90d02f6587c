"""A decoding step's 30 layers three ways: torch's element-wise ops and SDPA; the CPU extension's ops called module by
module (RMSNorm, rotary + cache write, attention); and the whole decoder layer in one extension call
(docs/architecture.md, "Model core"). The products go to the packed kernel in all three.

Default model, batch 1, a 200-token context, 1 to 16 query tokens (a chain, as a tree step); the three take turns,
40 rounds, and the median of each is printed in ms. fp32 unless `bfloat16` is given.

    python benchmarks/fused_layer.py [float32|bfloat16]     # about a minute
"""

import statistics
import sys
import time

import torch

from propd.models import cpu_kernel
from propd.models.llama import DecoderLayer
from propd.models.loading import load_model

dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
lm = load_model("smollm2-135m-instruct", dtype=dtype)
lm.prepare()
m = lm.model
if cpu_kernel.extension() is None:
    sys.exit("the CPU extension is unavailable here")
real = {name: getattr(cpu_kernel, name) for name in ("attention_fits", "rope_fits", "rms_norm_fits")}
fused = DecoderLayer._fused_weights


def setup(mode):
    for name, f in real.items():
        setattr(cpu_kernel, name, f if mode != "torch ops" else (lambda *a, **k: False))
    DecoderLayer._fused_weights = fused if mode == "one call per layer" else (lambda self, x, k: None)


modes = ("torch ops", "extension ops per module", "one call per layer")
sizes = (1, 2, 4, 8, 16)
times = {}
cache = m.new_cache(1, 400)
with torch.inference_mode():
    m.prefill(cache, [list(range(100, 300))])
    for _ in range(40):
        for mode in modes:
            setup(mode)
            for T in sizes:
                mask, depths = torch.tril(torch.ones(T, T, dtype=torch.bool)), torch.arange(T)
                t0 = time.perf_counter()
                a = m.attention_inputs(cache, torch.arange(T)[None], mask, depths)
                m.run_layers(m.embed(torch.randint(0, 1000, (1, T))), 0, m.num_layers, cache, a)
                times.setdefault((mode, T), []).append((time.perf_counter() - t0) * 1000)
setup("one call per layer")
print(f"{'tokens':>6} " + " ".join(f"{mode:>26}" for mode in modes))
for T in sizes:
    print(f"{T:>6} " + " ".join(f"{statistics.median(times[(mode, T)]):23.2f} ms" for mode in modes))
