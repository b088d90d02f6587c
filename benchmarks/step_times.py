"""Where a CPU decoding step's time goes, and what loading costs, on the default model (float32 against ``gguf``).

    python benchmarks/step_times.py                       # load, GGUF reading, dequantize, step breakdown
    python benchmarks/step_times.py --presets ar,lookup --category summarization   # step times by tree size
    python benchmarks/step_times.py --nodes float32,gguf,gguf-q8   # a forward pass of 1-32 nodes per dtype

Parts (each prints its own lines):

* load: ``load_model`` per dtype, taking turns, best of 3 (s); the GGUF file's tensor table read by propd's
  header-only reader and by gguf's ``GGUFReader`` (ms); every block matrix dequantized by the extension and by torch
  ops (ms, as prefill does per call);
* breakdown: at a ``--context``-token context, batch 1, one node, medians of 30 (ms): ``attention_inputs``, the
  layers in one ``LayerStack`` call and one call per layer, norm + ``lm_head``, and a whole ``Decoder`` ``ar`` step;
* with ``--presets``: the median step time per tree size of each preset on ``--category``'s Spec-Bench prompts
  (first turns, batch 1, 128 tokens), threads left at torch's count;
* with ``--nodes``: a forward pass of a T-node tree (T = 1-32) per dtype, taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from propd.decoder import Decoder
from propd.models import cpu_kernel, quant
from propd.models.loading import fetch_known_gguf, load_model

MODEL = "smollm2-135m-instruct"
SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench" / "spec_bench" / "question.jsonl"


def median_ms(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def load_part() -> None:
    best = {"float32": [], "gguf": []}
    for _ in range(3):
        for dt in best:
            t = time.perf_counter()
            lm = load_model(MODEL, dtype=dt)
            best[dt].append(time.perf_counter() - t)
    print("load_model: " + ", ".join(f"{dt} {min(v):.2f} s" for dt, v in best.items()))
    from gguf import GGUFReader

    path = fetch_known_gguf(MODEL)
    print(f"GGUF tensor table: header-only reader {median_ms(lambda: quant._gguf_tensor_infos(path), 5):.1f} ms, "
          f"GGUFReader {median_ms(lambda: GGUFReader(str(path)), 3):.0f} ms")
    layers = [m for m in lm.model.modules() if isinstance(m, quant.QuantLinear) and m._dense is None]
    ext = median_ms(lambda: [cpu_kernel.dequantize(m.packed, m.out_features) for m in layers], 3)
    ref = median_ms(lambda: [quant.dequantize_packed(m.packed, m.fmt, m.out_features, m.in_features)
                             for m in layers], 3)
    print(f"dequantize {len(layers)} block matrices: extension {ext:.0f} ms, torch ops {ref:.0f} ms")


@torch.inference_mode()  # as the Decoder runs: the fused layer stack serves only without autograd
def breakdown(dtype: str, context: int) -> None:
    lm = load_model(MODEL, dtype=dtype)
    m = lm.model
    m.prepare()
    cache = m.new_cache(1, context + 80)
    prompt = list(range(1000, 1000 + context))
    m.prefill(cache, [prompt])
    mask, zero = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    node_idx, tok = torch.zeros(1, 1, dtype=torch.long), torch.tensor([[5]])
    a = m.attention_inputs(cache, node_idx, mask, zero)
    x = m.embed(tok)
    h = m.run_layers(x, 0, m.num_layers, cache, a)
    stack = median_ms(lambda: m.run_layers(x, 0, m.num_layers, cache, a))
    runner = m.__dict__.pop("fused_layers")
    try:
        per_layer = median_ms(lambda: m.run_layers(x, 0, m.num_layers, cache, a))
    finally:
        m.__dict__["fused_layers"] = runner
    parts = {"attention_inputs": median_ms(lambda: m.attention_inputs(cache, node_idx, mask, zero)),
             "layers, one call": stack, "layers, a call per layer": per_layer,
             "norm + lm_head": median_ms(lambda: m.logits(m.norm(h)))}
    r = Decoder(lm, preset="ar", threads=None).generate_ids([prompt], max_new_tokens=65)
    parts["Decoder ar step"] = statistics.median(s.step_time_s for s in r.stats) * 1e3
    print(f"{dtype}, {context}-token context: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + " (ms)")


@torch.inference_mode()
def by_nodes(dtypes: list[str], context: int, sizes=(1, 2, 4, 8, 16, 32)) -> None:
    """One forward pass of a T-node chain tree at a ``context``-token context, batch 1, per dtype (medians of 30, ms):
    embed, layers, norm and ``lm_head``, as a decoding step of T nodes runs them (the drafting and bookkeeping
    excluded). The dtypes take turns per tree size."""
    models = {}
    for dt in dtypes:
        m = load_model(MODEL, dtype=dt).model
        m.prepare()
        cache = m.new_cache(1, context + max(sizes) + 8)
        m.prefill(cache, [list(range(1000, 1000 + context))])
        models[dt] = (m, cache)
    rows = {dt: [] for dt in dtypes}
    for T in sizes:
        mask, depth = torch.ones(T, T, dtype=torch.bool).tril(), torch.arange(T)
        node_idx, tok = torch.arange(T)[None], torch.arange(5, 5 + T)[None]
        for dt, (m, cache) in models.items():
            def step(m=m, cache=cache):
                a = m.attention_inputs(cache, node_idx, mask, depth)
                return m.logits(m.norm(m.run_layers(m.embed(tok), 0, m.num_layers, cache, a)))
            rows[dt].append(median_ms(step))
    print(f"forward pass of T nodes, {context}-token context (ms; in parentheses: / 1 node):")
    for dt, times in rows.items():
        print(f"  {dt:8s} " + ", ".join(f"{T}: {t:.2f} ({t / times[0]:.2f})" for T, t in zip(sizes, times)))


def by_tree_size(presets: list[str], category: str) -> None:
    from propd.bench.questions import load_questions

    qs = [q.turn for q in load_questions(str(SPEC_BENCH), per_category=3, turns="first") if q.category == category]
    lm = load_model(MODEL, dtype="float32")
    kw = {"threads": None} if "threads" in Decoder.__init__.__code__.co_varnames else {}  # older propd: no tuner
    for p in presets:
        dec = Decoder(lm, preset=p, **kw)
        dec.generate(qs[:1], max_new_tokens=8)
        t = time.perf_counter()
        r = dec.generate(qs, max_new_tokens=128, batch_size=1)
        rate = sum(r.new_tokens) / (time.perf_counter() - t)
        sizes: dict[int, list[float]] = {}
        for s in r.stats:
            sizes.setdefault(s.tree_nodes, []).append(s.step_time_s)
        steps = ", ".join(f"{n} nodes {statistics.median(v) * 1e3:.1f}" for n, v in sorted(sizes.items()) if len(v) > 3)
        print(f"{p}: {rate:.1f} tokens/s; median step ms by tree size: {steps}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--presets", default=None, help="comma-separated: step times by tree size instead")
    ap.add_argument("--category", default="summarization")
    ap.add_argument("--nodes", default=None, help="comma-separated dtypes: forward passes of 1-32 nodes instead")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads, CPU extension ISA {cpu_kernel.isa()}")
    if args.presets:
        by_tree_size(args.presets.split(","), args.category)
        return
    if args.nodes:
        by_nodes(args.nodes.split(","), args.context)
        return
    load_part()
    for dt in ("float32", "gguf"):
        breakdown(dt, args.context)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
