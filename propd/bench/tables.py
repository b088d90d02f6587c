"""Table helpers shared by ``propd tune`` and the results tool (tools/results.py): rows of a bench summary, the
machine line, cells, speed-up tables and ProPD's Table 2 pruning grid."""

from __future__ import annotations

import json
from pathlib import Path


def summary_rows(d: Path) -> list[dict]:
    f = d / "summary.json"
    return [r for r in json.loads(f.read_text()) if r["category"] == "all"] if f.is_file() else []


def machine_line(d: Path, prompts: str = "Spec-Bench prompts") -> str:
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


def cell(v, fmt="{:.2f}") -> str:
    if isinstance(v, list):  # an interval
        return "-" if not v else "-".join(fmt.format(x).rstrip("x") for x in v) + ("x" if fmt.endswith("x") else "")
    return "-" if v is None else fmt.format(v)


def speed_table(rows: list[dict], methods: list[str], key="speedup_vs_ar", fmt="{:.2f}x") -> list[str]:
    sizes = sorted({r["batch_size"] for r in rows})
    by = {(r["preset"], r["batch_size"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"b={b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in methods:
        if any((m, b) in by for b in sizes):
            lines.append(f"| {m} | " + " | ".join(cell(by.get((m, b), {}).get(key), fmt) for b in sizes) + " |")
    return lines


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
            cells.append(f"{100 * rate:.0f}% / {cell(r['mean_accepted_tokens'])} / "
                         f"{cell(r['speedup_vs_ar'], '{:.2f}x')}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "medusa" in by:
        m = by["medusa"]
        lines += ["", f"No pruning (medusa): accepted {cell(m['mean_accepted_tokens'])}, speed-up "
                      f"{cell(m['speedup_vs_ar'], '{:.2f}x')}."]
    return lines
