"""Summaries and plots of a bench directory, computed from its answers and steps files only (so a resumed or
partial run reports what it holds).

propd's aggregate figures (every turn of every question counted):

* ``tokens_per_s`` = total new tokens / total wall time of the batches; ``speedup_vs_ar`` = that over the ``ar``
  preset's at the same batch size in the same run (a ratio of sums).
* ``decode_speedup_vs_ar``: the same ratio over the decoding steps alone: new tokens after each turn's first (which
  the prefill yields) divided by the summed step times, so that the prefill, identical work for every method, does
  not dilute it (None for baselines that record no step times).
* ``mean_accepted_tokens`` = new tokens / forward passes, the prefill counted as a pass (AR is 1.0).
* ``match_rate_vs_ar`` = share of questions whose token ids (every turn) equal ``ar``'s at that batch size.
* Per-category tokens/s divide the category's tokens by the wall time of the rows' batches, so in batches they share
  time with other categories and are indicative only.

Spec-Bench's figures (Xia et al. 2024, ``evaluation/speed.py``), computed the same way from the same answers:

* ``specbench_tokens_per_s`` = the mean over questions of (a question's new tokens, all turns) / (its wall time,
  all turns): a mean of per-question rates, not a ratio of sums; ``specbench_speedup`` = that over ``ar``'s. (Spec-Bench
  counts the baseline's tokens by re-tokenizing its text and subtracting a BOS; here both sides count generated ids.)
* ``specbench_accept_length`` = the mean of every decoding step's accept length (accepted tokens + the bonus token),
  the prefill not counted (``#Mean accepted tokens``).

``speedup_ci90`` is a 90% paired bootstrap interval of ``speedup_vs_ar``: the methods take turns batch by batch, so
each batch index gives a pair of (tokens, wall time) for the method and for ``ar``; resampling batch indices with
replacement (2,000 draws, fixed seed) and recomputing the ratio of sums shows how much of a ratio is the machine's
noise during the run (Efron & Tibshirani 1993, ch. 13). It needs two batches or more, and covers only the noise inside
one run, not drift between runs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _load(out: Path) -> dict[tuple[str, int], list[dict]]:
    from propd.bench.runner import _read_jsonl

    data = {}
    for f in sorted((out / "answers").glob("*.jsonl")):
        method, _, bs = f.stem.rpartition("-b")
        data[(method, int(bs))] = _read_jsonl(f)
    return data


def _steps(out: Path, method: str, bs: int) -> list[dict]:
    from propd.bench.runner import _read_jsonl

    return [s for r in _read_jsonl(out / "steps" / f"{method}-b{bs}.jsonl") for s in r["steps"]]


def summarize(out: Path) -> list[dict]:
    data = _load(out)
    rows = []
    for (method, bs), answers in data.items():
        if not answers:
            continue
        ar = {a["question_id"]: a["choices"][0]["token_ids"] for a in data.get(("ar", bs), [])}
        steps = [s for s in _steps(out, method, bs) if "step_time_s" in s]
        groups = defaultdict(list)
        for a in answers:
            groups["all"].append(a)
            groups[a["category"]].append(a)
        for cat, items in groups.items():
            ch = [a["choices"][0] for a in items]
            tokens = sum(sum(c["new_tokens"]) for c in ch)
            batches = {(a["batch_index"], c["batch_wall_time"]) for a, c in zip(items, ch)}
            wall = sum(w for _, w in batches)
            passes = [p for c in ch for p in c.get("forward_passes", c["decoding_steps"])]
            accepts = [x for c in ch for x in c["accept_lengths"]]
            rates = specbench_rates(items)
            row = {
                "preset": method, "batch_size": bs, "category": cat, "prompts": len(items), "new_tokens": tokens,
                "wall_time_s": round(wall, 4), "tokens_per_s": round(tokens / wall, 3) if wall else None,
                "mean_accepted_tokens": (round(tokens / sum(passes), 4) if all(passes) and sum(passes) else None),
                "specbench_tokens_per_s": round(sum(rates) / len(rates), 3) if rates else None,
                "specbench_accept_length": round(sum(accepts) / len(accepts), 4) if accepts else None,
                "match_rate_vs_ar": (round(sum(ar.get(a["question_id"]) == c["token_ids"] for a, c in zip(items, ch))
                                           / len(items), 4) if ar else None),
            }
            if cat == "all":
                decode_s = sum(s["step_time_s"] for s in steps)
                first_tokens = sum(len(c["new_tokens"]) for c in ch)  # one per turn, from its prefill
                row["decode_tokens_per_s"] = (round((tokens - first_tokens) / decode_s, 3) if decode_s > 0
                                              else None)
                row["mean_step_time_ms"] = round(1000 * decode_s / len(steps), 3) if steps else None
                # of which drafting (runs made before steps recorded it: None)
                row["mean_draft_ms"] = (round(1000 * sum(s["draft_time_s"] for s in steps) / len(steps), 3)
                                        if steps and all("draft_time_s" in s for s in steps) else None)
                row["mean_tree_nodes"] = round(sum(s["tree_nodes"] for s in steps) / len(steps), 2) if steps else None
                row["mean_nodes_after_pruning"] = (round(sum(s["nodes_after_pruning"] for s in steps) / len(steps), 2)
                                                   if steps else None)
            rows.append(row)
    base = {(r["batch_size"], r["category"]): r["tokens_per_s"] for r in rows if r["preset"] == "ar"}
    spec_base = {(r["batch_size"], r["category"]): r["specbench_tokens_per_s"] for r in rows if r["preset"] == "ar"}
    decode_base = {r["batch_size"]: r.get("decode_tokens_per_s") for r in rows
                   if r["preset"] == "ar" and r["category"] == "all"}
    for r in rows:
        b = base.get((r["batch_size"], r["category"]))
        r["speedup_vs_ar"] = round(r["tokens_per_s"] / b, 3) if b and r["tokens_per_s"] else None
        sb = spec_base.get((r["batch_size"], r["category"]))
        r["specbench_speedup"] = (round(r["specbench_tokens_per_s"] / sb, 3) if sb and r["specbench_tokens_per_s"]
                                  else None)
        if r["category"] == "all":
            d = decode_base.get(r["batch_size"])
            r["decode_speedup_vs_ar"] = (round(r["decode_tokens_per_s"] / d, 3)
                                         if d and r.get("decode_tokens_per_s") else None)
            r["speedup_ci90"] = speedup_interval(_per_batch(data.get((r["preset"], r["batch_size"]), [])),
                                                 _per_batch(data.get(("ar", r["batch_size"]), [])))
    return rows


def specbench_rates(answers: list[dict]) -> list[float]:
    """Spec-Bench's per-question rates: (new tokens of all turns) / (wall time of all turns), one per answer."""
    out = []
    for a in answers:
        c = a["choices"][0]
        if sum(c["wall_time"]) > 0:
            out.append(sum(c["new_tokens"]) / sum(c["wall_time"]))
    return out


def _per_batch(answers: list[dict]) -> dict[int, tuple[int, float]]:
    """batch index -> (new tokens, wall time) of one (method, batch size)."""
    out: dict[int, tuple[int, float]] = {}
    for a in answers:
        c = a["choices"][0]
        tokens, _ = out.get(a["batch_index"], (0, 0.0))
        out[a["batch_index"]] = (tokens + sum(c["new_tokens"]), c["batch_wall_time"])
    return out


def speedup_interval(method: dict[int, tuple[int, float]], ar: dict[int, tuple[int, float]], level: float = 0.9,
                     draws: int = 2000, seed: int = 0) -> list[float] | None:
    """Paired bootstrap interval [lo, hi] of (sum tokens_m / sum wall_m) / (sum tokens_ar / sum wall_ar) over the
    batch indices both hold; None with fewer than two."""
    import numpy as np

    idx = sorted(set(method) & set(ar))
    if len(idx) < 2:
        return None
    m = np.array([method[i] for i in idx], dtype=np.float64)  # (n, 2): tokens, wall
    a = np.array([ar[i] for i in idx], dtype=np.float64)
    pick = np.random.default_rng(seed).integers(0, len(idx), size=(draws, len(idx)))
    ratio = (m[pick, 0].sum(1) / m[pick, 1].sum(1)) / (a[pick, 0].sum(1) / a[pick, 1].sum(1))
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 3), round(float(hi), 3)]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "-".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def write_report(out: str | Path) -> list[dict]:
    out = Path(out)
    rows = summarize(out)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    cols = ["preset", "batch_size", "tokens_per_s", "speedup_vs_ar", "speedup_ci90", "decode_speedup_vs_ar",
            "specbench_speedup", "mean_accepted_tokens", "specbench_accept_length", "mean_step_time_ms",
            "mean_draft_ms", "mean_tree_nodes", "mean_nodes_after_pruning", "match_rate_vs_ar", "new_tokens", "prompts"]
    lines = [f"# propd bench: {run.get('model', '?')}", ""]
    m, c = run.get("machine", {}), run.get("config", {})
    lines.append(f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')} "
                 f"({m.get('threads', '?')} threads){', ' + m['gpu'] if m.get('gpu') else ''}; dtype "
                 f"{c.get('dtype', '?')}, device {c.get('device', '?')}, max_new_tokens {c.get('max_new_tokens', '?')}; "
                 f"{m.get('date', '?')}.")
    if c.get("temperature"):
        lines.append(f"Sampling: temperature {c['temperature']}, top_p {c.get('top_p', 1.0)}, top_k {c.get('top_k', 0)}, "
                     f"seed {c.get('seed', 0)}: accepted lengths are at this temperature, and outputs are samples "
                     f"(match_rate_vs_ar compares samples, not a correctness check).")
    lines.append(f"Turns: {c.get('turns', '?')}. Definitions: propd.bench.report (speedup_vs_ar: a ratio of "
                 f"total tokens over total time; specbench_speedup: Spec-Bench's mean of per-question rates; "
                 f"mean_accepted_tokens counts the prefill as a pass, specbench_accept_length does not).")
    lines += ["", "## Overall", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    overall = sorted((r for r in rows if r["category"] == "all"), key=lambda r: (r["batch_size"], r["preset"]))
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in overall]
    not_run = json.loads((out / "not_run.json").read_text()) if (out / "not_run.json").is_file() else {}
    if not_run:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(not_run.items())) + "."]
    cats = sorted({r["category"] for r in rows} - {"all"})
    if cats:
        ccols = ["preset", "batch_size", "category", "tokens_per_s", "speedup_vs_ar", "mean_accepted_tokens",
                 "match_rate_vs_ar", "prompts"]
        lines += ["", "## Per category", "", "| " + " | ".join(ccols) + " |", "|" + "---|" * len(ccols)]
        per = sorted((r for r in rows if r["category"] != "all"),
                     key=lambda r: (r["category"], r["batch_size"], r["preset"]))
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in ccols) + " |" for r in per]
    plots = _plots(out, rows)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def _plots(out: Path, rows: list[dict]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        (out / "PLOTS_MISSING.txt").write_text("matplotlib is not installed: pip install 'propd[bench]'\n")
        return []
    made = []
    overall = [r for r in rows if r["category"] == "all" and r["tokens_per_s"]]
    methods = sorted({r["preset"] for r in overall})
    fig, ax = plt.subplots(figsize=(6, 4))
    for meth in methods:
        pts = sorted((r["batch_size"], r["tokens_per_s"]) for r in overall if r["preset"] == meth)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)
    ax.set(xlabel="batch size", ylabel="tokens/s", title="Throughput vs batch size (cf. ProPD Fig. 7)", xscale="log")
    ax.legend()
    made.append(_save(fig, out / "throughput_vs_batch.png"))
    cat_rows = [r for r in rows if r["category"] != "all" and r["mean_accepted_tokens"]]
    if cat_rows:
        bs0 = min(r["batch_size"] for r in cat_rows)
        cats = sorted({r["category"] for r in cat_rows})
        meths = sorted({r["preset"] for r in cat_rows})
        fig, ax = plt.subplots(figsize=(max(6, len(cats) * 0.8), 4))
        w = 0.8 / max(len(meths), 1)
        for k, meth in enumerate(meths):
            vals = {r["category"]: r["mean_accepted_tokens"] for r in cat_rows
                    if r["preset"] == meth and r["batch_size"] == bs0}
            ax.bar([i + k * w for i in range(len(cats))], [vals.get(c, 0) for c in cats], w, label=meth)
        ax.set_xticks([i + w * (len(meths) - 1) / 2 for i in range(len(cats))], cats, rotation=45, ha="right")
        ax.set(ylabel="mean accepted tokens / step", title=f"Accepted length per category, batch {bs0} (cf. Fig. 3d)")
        ax.legend()
        made.append(_save(fig, out / "accepted_per_category.png"))
    ablation = [m for m in ("medusa", "propd-prune-only", "propd-dynamic-only", "propd") if m in methods]
    if len(ablation) >= 2:
        sizes = sorted({r["batch_size"] for r in overall if r["preset"] in ablation})
        fig, ax = plt.subplots(figsize=(max(6, len(sizes) * 1.4), 4))
        w = 0.8 / len(ablation)
        for k, meth in enumerate(ablation):
            vals = {r["batch_size"]: r["speedup_vs_ar"] for r in overall if r["preset"] == meth}
            ax.bar([i + k * w for i in range(len(sizes))], [vals.get(b) or 0 for b in sizes], w, label=meth)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([i + w * (len(ablation) - 1) / 2 for i in range(len(sizes))], [f"b={b}" for b in sizes])
        ax.set(ylabel="speed-up over ar", title="Ablation: pruning, dynamic sizing, both (cf. ProPD Table 3)")
        ax.legend(fontsize=8)
        made.append(_save(fig, out / "ablation.png"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    any_steps = False
    for meth in methods:
        for bs in sorted({r["batch_size"] for r in overall if r["preset"] == meth}):
            st = [s for s in _steps(out, meth, bs) if "step_time_s" in s]
            if not st:
                continue
            any_steps = True
            a1.scatter([s["nodes_after_pruning"] for s in st], [1000 * s["step_time_s"] for s in st], s=4,
                       label=f"{meth} b={bs}")
            a2.scatter([s["context_len"] for s in st], [1000 * s["step_time_s"] for s in st], s=4,
                       label=f"{meth} b={bs}")
    if any_steps:
        a1.set(xlabel="tree nodes per row (after pruning)", ylabel="step time (ms)", title="Step time vs tree size (Fig. 3b)")
        a2.set(xlabel="context length (tokens)", ylabel="step time (ms)", title="Step time vs context (Fig. 3c)")
        a1.legend(fontsize=7)
        made.append(_save(fig, out / "step_time.png"))
    else:
        plt.close(fig)
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
