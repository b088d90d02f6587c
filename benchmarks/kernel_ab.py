"""Two builds of propd's CPU extension against each other on a decoding step's layers, in one process, taking turns
call by call (so the machine's drift slows both alike; separate processes taking turns were too noisy on a shared
2-core machine to read differences of a few percent).

    python benchmarks/kernel_ab.py                          # HEAD's kernel source against the working tree's
    python benchmarks/kernel_ab.py --base HEAD~3 --dtype bfloat16 --nodes 1,4,8,16 --context 1500
    python benchmarks/kernel_ab.py --base old.cpp --isa avx2   # a source file; the AVX2 path on both

Each build (``--base``, a git revision or a file, and the working tree's ``propd/models/csrc/packed_linear.cpp``) is
compiled as its own module (cached by content, as propd caches its own); both get a ``LayerStack`` over the default
model's packed weights in ``--dtype``, and for each tree size T (a chain of T nodes, batch 1, after a
``--context``-token prompt) run a step's layers ``--calls`` times each, alternating. Prints the medians (ms) and
new / base. The two builds must pack weights alike (the same ``pack`` layout).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from propd.models import cpu_kernel
from propd.models.cpu_modules import _layer_inputs
from propd.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
REL = "propd/models/csrc/packed_linear.cpp"


def source_of(base: str, tmp: Path) -> Path:
    """``base`` as a source file: a path as it is, else the kernel source at that git revision."""
    if Path(base).is_file():
        return Path(base)
    text = subprocess.run(["git", "show", f"{base}:{REL}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = tmp / "base" / "packed_linear.cpp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build(src: Path):
    from torch.utils import cpp_extension

    name = "propd_kernel_ab_" + hashlib.sha1(src.read_bytes() + " ".join(cpu_kernel.CFLAGS).encode()).hexdigest()[:12]
    return cpp_extension.load(name, [str(src)], extra_cflags=cpu_kernel.CFLAGS, extra_ldflags=["-fopenmp"],
                              verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="a git revision or a source file (default: HEAD)")
    ap.add_argument("--dtype", default="gguf", help="float32, bfloat16, gguf or gguf-q8 (default: gguf)")
    ap.add_argument("--nodes", default="1,4,8,16", help="tree sizes (chains of T nodes), at most 16")
    ap.add_argument("--context", type=int, default=300, help="prompt tokens before the step (default 300)")
    ap.add_argument("--calls", type=int, default=150, help="calls of each build per tree size (default 150)")
    ap.add_argument("--isa", choices=["best", "avx2"], default="best", help="avx2: both builds on their AVX2 path")
    args = ap.parse_args()
    if cpu_kernel.extension() is None:
        raise SystemExit("propd's CPU extension is unavailable on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        base = build(source_of(args.base, Path(tmp)))
    new = build(ROOT / REL)
    if args.isa == "avx2":
        for ext in (base, new, cpu_kernel.extension()):
            ext.set_isa_limit(1)
    lm = load_model("smollm2-135m-instruct", dtype=args.dtype)
    m = lm.model
    m.prepare()
    cache = m.new_cache(1, args.context + 64)
    m.prefill(cache, [[100 + i % 40000 for i in range(args.context)]])
    print(f"{args.dtype}, {args.context}-token context, batch 1, {torch.get_num_threads()} threads, "
          f"ISA {cpu_kernel.isa() if args.isa == 'best' else 'avx2'}; base {args.base} against the working tree")
    with torch.inference_mode():
        layers = m.model.layers
        for T in (int(t) for t in args.nodes.split(",")):
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
            a = m.attention_inputs(cache, torch.arange(T).expand(1, T), mask, torch.arange(T))
            x = m.embed(torch.randint(0, m.cfg.vocab_size, (1, T)))
            fused = [layer._fused_weights(x, cache.layer(0)[0]) for layer in layers]
            if any(f is None for f in fused):
                print(f"  {T} nodes: the layers do not take the fused path here; skipped")
                continue
            weights = [w for f in fused for w in f[0]]
            eps, scale = layers[0].input_layernorm.eps, layers[0].self_attn.cfg.head_dim ** -0.5
            stacks = [ext.LayerStack(weights, fused[0][1], eps, scale, []) for ext in (base, new)]
            cos, sin, pos, msk = _layer_inputs(a)
            outs = [s.run(x.contiguous(), cos, sin, cache.k, cache.v, pos, msk, 0, len(layers)) for s in stacks]
            same = torch.equal(outs[0], outs[1])
            times: list[list[float]] = [[], []]
            for i in range(args.calls):
                for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                    t = time.perf_counter()
                    stacks[j].run(x.contiguous(), cos, sin, cache.k, cache.v, pos, msk, 0, len(layers))
                    times[j].append(time.perf_counter() - t)
            b, n = (statistics.median(t) * 1e3 for t in times)
            print(f"  {T:2d} nodes: base {b:6.2f} ms  new {n:6.2f} ms  new/base {n / b:.3f}"
                  f"  {'same output' if same else 'OUTPUTS DIFFER'}")


if __name__ == "__main__":
    main()
