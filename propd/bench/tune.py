"""``propd tune``: choose ProPD's fixed parameters on held-out *training* prompts, never on the benchmark.

ProPD (Zhong et al. 2024, arXiv 2402.13485) leaves a few constants to the implementer: the pruning layer n and top-k
of early pruning (section 4.1; the paper uses n=4, k=50 for Vicuna) and, for dynamic tree sizing (section 4.2), the
EMA rate alpha of the acceptance estimates ``P_i^k <- (1-alpha) P_i^k + alpha * 1(hit)``, the forgetting rate lambda
of the regression weights ``W_i = exp(-lambda * o_i)`` and the candidate sizes S. They depend on the model and its
heads, so propd measures them per model:

* ``prune``: ``propd-prune-only`` (mc_sim_7b_63 + early-topk) for every (layer, k) of the grid at batch 4, beside
  ``ar`` and ``medusa`` (the paper's Table 2 procedure);
* ``sizer``: ``propd`` with every (alpha, lambda) of the grid and a smaller candidate set, at batch 1, beside ``ar``
  and the ``propd`` preset itself, which has the default values and so shows the run-to-run noise; in the same run,
  ``propd`` with the pruner's ``min_nodes`` (the smallest tree that is pruned) set to each value of its grid, and
  ``propd-dynamic-only`` (no pruning at all), since the trees the sizer picks decide whether pruning pays.

The prompts are the training prompts that ``propd train-heads --max-prompts SKIP`` did not distil from
(:func:`propd.training.data.held_out_questions`), written to ``OUT/question.jsonl``. Each run is an ordinary
``propd bench`` directory (resumable). ``OUT/tuning.md`` holds the tables and the best cell of each grid by
tokens/s (``tools/tune_docs.py`` copies them into docs/propd.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import attrs

from propd.bench.runner import BenchConfig, run_bench
from propd.bench.tables import cell, machine_line, prune_grid, summary_rows
from propd.errors import PropdError
from propd.presets import PROPD_PRUNER
from propd.training.data import DEFAULT_MAX_PROMPTS

SMALL_SIZES = (1, 2, 4, 8, 16)


@attrs.frozen
class TuneConfig:
    out: str
    data: str | None = None
    skip: int = DEFAULT_MAX_PROMPTS  # train-heads' default --max-prompts: those prompts trained the heads
    per_source: int = 6
    max_new_tokens: int = 32
    layers: tuple[int, ...] = (2, 3, 4)
    topk: tuple[int, ...] = (50, 100, 200)
    alphas: tuple[float, ...] = (0.02, 0.05, 0.1)
    lams: tuple[float, ...] = (0.02, 0.05, 0.2)
    min_nodes: tuple[int, ...] = (2, 8)  # besides the preset's own value
    prune_batch_size: int = 4
    sizer_batch_size: int = 1
    model: str = "smollm2-135m-instruct"
    heads: str | None = None
    device: str = "cpu"
    warmup: int = 1
    only: tuple[str, ...] = ("prune", "sizer")


def _label(x: float) -> str:
    return f"{x:g}"


def sizer_label(alpha: float, lam: float) -> str:
    return f"a{_label(alpha)}-l{_label(lam)}"


def runs(cfg: TuneConfig, questions: str) -> dict[str, BenchConfig]:
    base = dict(questions=questions, resume=True, model=cfg.model, heads=cfg.heads, warmup=cfg.warmup,
                device=cfg.device, max_new_tokens=cfg.max_new_tokens, dtype="float32")
    out = Path(cfg.out)
    prune = tuple(f"l{n}-k{k}=propd-prune-only;pruner=early-topk:layer={n},k={k}"
                  for n in cfg.layers for k in cfg.topk)
    sizer = tuple(f"{sizer_label(a, lam)}=propd;sizer=propd-dynamic:alpha={a},lam={lam}"
                  for a in cfg.alphas for lam in cfg.lams)
    sizer += (f"S-small=propd;sizer=propd-dynamic:sizes={list(SMALL_SIZES)}".replace(" ", ""),)
    pruner, opts = PROPD_PRUNER
    keep = ",".join(f"{k}={v}" for k, v in opts.items() if k != "min_nodes")
    sizer += tuple(f"m{m}=propd;pruner={pruner}:{keep},min_nodes={m}" for m in cfg.min_nodes)
    all_runs = {
        "prune": BenchConfig(out=str(out / "prune"), presets=("ar", "medusa"), variants=prune,
                             batch_sizes=(cfg.prune_batch_size,), **base),
        "sizer": BenchConfig(out=str(out / "sizer"), presets=("ar", "propd", "propd-dynamic-only"),
                             variants=sizer, batch_sizes=(cfg.sizer_batch_size,), **base),
    }
    unknown = sorted(set(cfg.only) - set(all_runs))
    if unknown:
        raise PropdError(f"unknown run(s) {unknown} (known: {', '.join(all_runs)})")
    return {k: v for k, v in all_runs.items() if k in cfg.only}


def write_questions(cfg: TuneConfig) -> Path:
    from propd.training.data import find_train_dir, held_out_questions

    qs = held_out_questions(find_train_dir(cfg.data), cfg.skip, cfg.per_source)
    path = Path(cfg.out) / "question.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(q) + "\n" for q in qs)
    if path.is_file() and path.read_text() != text:
        raise PropdError(f"{path} holds other questions than this configuration's: use a fresh --out")
    path.write_text(text)
    return path


def run_tune(cfg: TuneConfig) -> Path:
    out = Path(cfg.out)
    questions = write_questions(cfg)
    for name, bench in runs(cfg, str(questions)).items():
        print(f"propd: tune: run {name} -> {bench.out}", file=sys.stderr, flush=True)
        run_bench(bench)
    text = tables(out, cfg)
    (out / "tuning.md").write_text(text)
    return out


def _fastest(rows: list[dict], labels: list[str]) -> list[str]:
    """The grid cell with the most tokens/s, as a line for the table (none when nothing was measured)."""
    cand = [r for r in rows if r["preset"] in labels and r.get("tokens_per_s")]
    if not cand:
        return []
    best = max(cand, key=lambda r: r["tokens_per_s"])
    return ["", f"Fastest cell: {best['preset']} ({cell(best['speedup_vs_ar'], '{:.2f}x')} `ar`)."]


def tables(out: Path, cfg: TuneConfig) -> str:
    lines = ["_Generated by `propd tune`; do not edit by hand._", ""]
    what = f"held-out training prompts ({cfg.per_source} per source, after the first {cfg.skip})"
    rows = summary_rows(out / "prune")
    if rows:
        lines += [f"#### Early pruning at batch {cfg.prune_batch_size}", "",
                  f"Machine: {machine_line(out / 'prune', what)}.", ""]
        lines += prune_grid(rows, cfg.layers, cfg.topk)
        lines += _fastest(rows, [f"l{n}-k{k}" for n in cfg.layers for k in cfg.topk])
        lines.append("")
    rows = summary_rows(out / "sizer")
    if rows:
        by = {r["preset"]: r for r in rows}
        lines += [f"#### Dynamic sizing at batch {cfg.sizer_batch_size}", "",
                  f"Machine: {machine_line(out / 'sizer', what)}.", "",
                  "Each cell: speed-up over `ar` / mean accepted tokens / mean tree nodes per step.", "",
                  "| alpha | " + " | ".join(f"lambda {_label(lam)}" for lam in cfg.lams) + " |",
                  "|---|" + "---|" * len(cfg.lams)]
        fmt = lambda r: ("-" if r is None else  # noqa: E731
                         f"{cell(r['speedup_vs_ar'], '{:.2f}x')} / {cell(r['mean_accepted_tokens'])} / "
                         f"{cell(r.get('mean_tree_nodes'), '{:.1f}')}")
        for a in cfg.alphas:
            lines.append(f"| {_label(a)} | " + " | ".join(fmt(by.get(sizer_label(a, lam))) for lam in cfg.lams)
                         + " |")
        lines += ["", f"Candidate sizes {list(SMALL_SIZES)} (alpha, lambda defaults): {fmt(by.get('S-small'))}; "
                      f"the `propd` preset as shipped (a second measurement of its defaults, for the noise): "
                      f"{fmt(by.get('propd'))}."]
        lines += _fastest(rows, [sizer_label(a, lam) for a in cfg.alphas for lam in cfg.lams] + ["S-small"])
        preset_min = PROPD_PRUNER[1].get("min_nodes")
        cells = [(f"{m}", by.get(f"m{m}")) for m in cfg.min_nodes]
        cells += [(f"{preset_min} (`propd`)", by.get("propd")),
                  ("never (`propd-dynamic-only`)", by.get("propd-dynamic-only"))]
        lines += ["", f"Smallest tree that `{PROPD_PRUNER[0]}` prunes (`min_nodes`), alpha and lambda defaults, "
                      "same run:", "",
                  "| min_nodes | speed-up / accepted / nodes per step |", "|---|---|"]
        lines += [f"| {label} | {fmt(r)} |" for label, r in cells]
        lines.append("")
    return "\n".join(lines) + "\n"

