"""Plots of a heads report (``report.json`` from ``propd train-heads``)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_early_topk(report: dict | str | Path, path: str | Path) -> Path | None:
    """Top-k accuracy of each early layer's head against the full model's next token (cf. ProPD Fig. 3a)."""
    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["early_layers"]:
        ks = sorted(int(k[3:]) for k in row if k.startswith("top"))
        ax.plot(ks, [row[f"top{k}"] for k in ks], marker="o", label=f"after layer {row['layer']}")
    ax.axhline(0.37, color="grey", ls=":", lw=1)
    ax.text(1.05, 0.38, "ProPD paper: layer 2 top-1 ~37% (Vicuna-7B)", fontsize=7, color="grey")
    ax.set(xscale="log", xlabel="k", ylabel="P(full model's next token in early top-k)", ylim=(0, 1.02),
           title=f"Early-exit heads, {report.get('model', '')} (validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
