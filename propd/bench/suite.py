"""``propd results``: every run behind docs/results.md and docs/propd.md, then their tables and plots, in one command.

Runs (each an ordinary ``propd bench`` directory under ``--out``, resumable):

* ``fp32``: ar, bpd, medusa, propd and its two ablations, with transformers' ``generate`` (hf) and prompt lookup
  decoding (hf-pld, batch 1 only), at batch sizes 1, 2, 4, 8, 16: the paper's Table 1 (speed-up over AR per batch
  size), Table 3 (ablation) and Fig. 7 analogues;
* ``bf16``: ar, medusa, propd, its two ablations and hf at batch 1 and 4 (bf16 matrix products are slow on CPU
  builds of torch, so the sample is smaller);
* ``table2``: the early-pruning grid at batch 4, pruning after layer 1-4 with top-k 50/100/150/200 on the
  mc_sim_7b_63 tree, beside ar and medusa (the paper's Table 2).

Then it writes ``tables.md`` and the plots into ``--out``, copies the plots into ``docs/img/results/`` and replaces
the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in docs/results.md with the tables. The
questions are Spec-Bench's (``shared/data/bench/spec_bench``); nothing here is tuned on them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import attrs

from propd.bench.runner import BenchConfig, run_bench
from propd.errors import PropdError

ABLATION = ("medusa", "propd-prune-only", "propd-dynamic-only", "propd")
TABLE2_LAYERS = (1, 2, 3, 4)
TABLE2_TOPK = (50, 100, 150, 200)
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@attrs.frozen
class SuiteConfig:
    questions: str
    out: str
    docs: str | None = "docs"
    per_category: int = 1
    max_new_tokens: int = 48
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    bf16_limit: int = 6
    bf16_batch_sizes: tuple[int, ...] = (1, 4)
    table2_tokens: int = 32
    only: tuple[str, ...] = ("fp32", "bf16", "table2")
    model: str = "smollm2-135m-instruct"
    heads: str | None = None
    warmup: int = 1
    device: str = "cpu"
    table2_layers: tuple[int, ...] = TABLE2_LAYERS
    table2_topk: tuple[int, ...] = TABLE2_TOPK


def runs(cfg: SuiteConfig) -> dict[str, BenchConfig]:
    # first turns only: docs/results.md's tables were measured so, and a rerun must stay comparable with them
    base = dict(questions=cfg.questions, resume=True, model=cfg.model, heads=cfg.heads, warmup=cfg.warmup,
                device=cfg.device, turns="first")
    out = Path(cfg.out)
    grid = tuple(f"l{n}-k{k}=propd-prune-only;pruner=early-topk:layer={n},k={k}"
                 for n in cfg.table2_layers for k in cfg.table2_topk)
    all_runs = {
        "fp32": BenchConfig(out=str(out / "fp32"), presets=("ar", "bpd") + ABLATION, baselines=("hf", "hf-pld"),
                            batch_sizes=cfg.batch_sizes, per_category=cfg.per_category,
                            max_new_tokens=cfg.max_new_tokens, dtype="float32", **base),
        "bf16": BenchConfig(out=str(out / "bf16"), presets=("ar",) + ABLATION, baselines=("hf",),
                            batch_sizes=cfg.bf16_batch_sizes, limit=cfg.bf16_limit,
                            max_new_tokens=cfg.table2_tokens, dtype="bfloat16", **base),
        "table2": BenchConfig(out=str(out / "table2"), presets=("ar", "medusa"), variants=grid, batch_sizes=(4,),
                              per_category=cfg.per_category, max_new_tokens=cfg.table2_tokens, dtype="float32",
                              **base),
    }
    unknown = sorted(set(cfg.only) - set(all_runs))
    if unknown:
        raise PropdError(f"unknown run(s) {unknown} (known: {', '.join(all_runs)})")
    return {k: v for k, v in all_runs.items() if k in cfg.only}


def run_suite(cfg: SuiteConfig) -> Path:
    out = Path(cfg.out)
    for name, bench in runs(cfg).items():
        print(f"propd: results: run {name} -> {bench.out}", file=sys.stderr, flush=True)
        run_bench(bench)
    text = tables(out, cfg.table2_layers, cfg.table2_topk)
    (out / "tables.md").write_text(text)
    if cfg.docs:
        _publish(out, Path(cfg.docs), text)
    return out


# ------------------------------------------------------------------------------------------------- tables


def _rows(d: Path) -> list[dict]:
    f = d / "summary.json"
    return [r for r in json.loads(f.read_text()) if r["category"] == "all"] if f.is_file() else []


def _machine(d: Path, prompts: str = "Spec-Bench prompts") -> str:
    import datetime as dt

    from propd.bench.runner import _read_jsonl

    run = json.loads((d / "run.json").read_text())
    m, c = run["machine"], run["config"]
    n = run.get("num_prompts", "?")
    stamps = [a["tstamp"] for f in (d / "answers").glob("*.jsonl") for a in _read_jsonl(f)]
    when = m["date"]
    if stamps:  # a resumed run measured its pairs at different times: say when
        fmt = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        when = f"measured {fmt(min(stamps))} to {fmt(max(stamps))} UTC"
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), {c['dtype']}, "
            f"{n} {prompts}, {c['max_new_tokens']} new tokens, {when}")


def _cell(v, fmt="{:.2f}") -> str:
    if isinstance(v, list):  # an interval
        return "-" if not v else "-".join(fmt.format(x).rstrip("x") for x in v) + ("x" if fmt.endswith("x") else "")
    return "-" if v is None else fmt.format(v)


def _speed_table(rows: list[dict], methods: list[str], key="speedup_vs_ar", fmt="{:.2f}x") -> list[str]:
    sizes = sorted({r["batch_size"] for r in rows})
    by = {(r["preset"], r["batch_size"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"b={b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in methods:
        if any((m, b) in by for b in sizes):
            lines.append(f"| {m} | " + " | ".join(_cell(by.get((m, b), {}).get(key), fmt) for b in sizes) + " |")
    return lines


def tables(out: Path, layers=TABLE2_LAYERS, topk=TABLE2_TOPK) -> str:
    lines = ["_Generated by `propd results`; do not edit by hand._", ""]
    fp32, bf16, t2 = out / "fp32", out / "bf16", out / "table2"
    for name, d in (("fp32", fp32), ("bf16", bf16)):
        rows = _rows(d)
        if not rows:
            continue
        methods = [m for m in ("hf", "hf-pld", "ar", "bpd") + ABLATION if any(r["preset"] == m for r in rows)]
        lines += [f"### Speed-up over `ar` per batch size, {name} (cf. ProPD Table 1 and Table 3)", "",
                  f"Machine: {_machine(d)}.", ""]
        lines += _speed_table(rows, methods)
        lines += ["", f"90% paired bootstrap interval of the speed-up over batches ({name}; the noise inside this run, "
                  "not between runs; '-' where the prompts fill one batch):", ""]
        lines += _speed_table(rows, [m for m in methods if m != "ar"], "speedup_ci90")
        lines += ["", f"Speed-up over `ar` of the decoding steps alone ({name}; the prefill, the same work for every "
                  "method, left out of both):", ""]
        lines += _speed_table(rows, [m for m in methods if not m.startswith("hf")], "decode_speedup_vs_ar")
        lines += ["", f"Tokens/s ({name}):", ""] + _speed_table(rows, methods, "tokens_per_s", "{:.1f}")
        lines += ["", f"Mean accepted tokens per step ({name}; the bonus token counted, AR = 1):", ""]
        lines += _speed_table(rows, [m for m in methods if not m.startswith("hf")], "mean_accepted_tokens", "{:.2f}")
        lines += ["", f"Mean tree nodes per row after pruning ({name}):", ""]
        lines += _speed_table(rows, [m for m in methods if not m.startswith("hf")], "mean_nodes_after_pruning",
                              "{:.1f}")
        match = {r["preset"]: r["match_rate_vs_ar"] for r in rows if r["match_rate_vs_ar"] is not None}
        worst = {m: min(r["match_rate_vs_ar"] for r in rows if r["preset"] == m and r["match_rate_vs_ar"] is not None)
                 for m in match}
        lines += ["", f"Output match rate against `ar` ({name}, lowest over batch sizes): "
                  + ", ".join(f"{m} {100 * v:.0f}%" for m, v in worst.items()) + ".", ""]
        if (d / "throughput_vs_batch.png").is_file():
            lines += [f"![throughput {name}](img/results/{name}-throughput_vs_batch.png)", ""]
        for png, what in (("ablation", "ablation"), ("step_time", "step time vs tree size and context (Fig. 3b, 3c)"),
                          ("accepted_per_category", "accepted tokens per category (Fig. 3d)")):
            if (d / f"{png}.png").is_file():
                lines += [f"![{what}, {name}](img/results/{name}-{png}.png)", ""]
    rows = _rows(t2)
    if rows:
        lines += ["### Early pruning grid at batch 4 (cf. ProPD Table 2)", "", f"Machine: {_machine(t2)}.", ""]
        lines += prune_grid(rows, layers, topk)
        lines.append("")
    return "\n".join(lines) + "\n"


def prune_grid(rows: list[dict], layers, topk, label="l{n}-k{k}") -> list[str]:
    """Table 2's grid: per (layer, top-k) cell, prune rate / mean accepted tokens / speed-up over ``ar``."""
    by = {r["preset"]: r for r in rows}
    lines = ["Each cell: prune rate / mean accepted tokens / speed-up over `ar` (mc_sim_7b_63 tree, 64 nodes).", "",
             "| layer | " + " | ".join(f"top-{k}" for k in topk) + " |", "|---|" + "---|" * len(topk)]
    for n in layers:
        cells = []
        for k in topk:
            r = by.get(label.format(n=n, k=k))
            if r is None or not r.get("mean_tree_nodes"):
                cells.append("-")
                continue
            rate = 1 - r["mean_nodes_after_pruning"] / r["mean_tree_nodes"]
            cells.append(f"{100 * rate:.0f}% / {_cell(r['mean_accepted_tokens'])} / "
                         f"{_cell(r['speedup_vs_ar'], '{:.2f}x')}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "medusa" in by:
        m = by["medusa"]
        lines += ["", f"No pruning (medusa): accepted {_cell(m['mean_accepted_tokens'])}, speed-up "
                      f"{_cell(m['speedup_vs_ar'], '{:.2f}x')}."]
    return lines


def _publish(out: Path, docs: Path, text: str) -> None:
    img = docs / "img" / "results"
    img.mkdir(parents=True, exist_ok=True)
    for name in ("fp32", "bf16", "table2"):
        for png in sorted((out / name).glob("*.png")):
            shutil.copy(png, img / f"{name}-{png.name}")
    replace_block(docs / "results.md", BEGIN, END, text)


def replace_block(doc_path: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` marker lines of a doc (if it has them) with ``text``."""
    if not doc_path.is_file():
        return
    doc = doc_path.read_text()
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc_path.write_text(f"{head}{begin}\n{text}{end}{tail}")
