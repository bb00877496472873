"""PNG plots of a steerability report (matplotlib, no display needed).

- ``steerability.png``: requested vs measured per attribute under the primary judge, mean with its
  95% interval per level, one line per best-of N and one for the prompt baseline;
- ``steerability-judge-J.png``: the same under each further judge;
- ``crosstalk.png``: the cross-talk heatmap (varied attribute x measured attribute, Spearman) at the
  largest best-of N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _level_line(ax, levels: list[dict], label: str, style: str, offset: float) -> None:
    pts = [lv for lv in levels if lv["mean"] is not None]
    x = np.array([lv["requested"] for lv in pts], dtype=float) + offset
    y = np.array([lv["mean"] for lv in pts])
    err = None
    if all(lv.get("ci95") for lv in pts):
        err = np.array([[lv["mean"] - lv["ci95"][0] for lv in pts], [lv["ci95"][1] - lv["mean"] for lv in pts]])
    ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label, markersize=4)


def plot_steerability(judge: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(judge["steerability"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8), squeeze=False)
    sizes = list(judge.get("best_of", {}))
    for ax, name in zip(axes[0], names):
        lo = min(lv["requested"] for lv in judge["steerability"][name]["levels"])
        hi = max(lv["requested"] for lv in judge["steerability"][name]["levels"])
        ax.plot([lo, hi], [lo, hi], color="0.75", lw=1, ls=":", label="ideal")
        for i, n in enumerate(sizes):
            block = judge["best_of"][n]["steerability"].get(name)
            if block:
                rho = block["spearman"]
                _level_line(ax, block["levels"], f"policy best-of-{n} (rho {rho if rho is None else f'{rho:.2f}'})",
                            "-o", 0.04 * (i - len(sizes) / 2))
        base = (judge.get("baseline") or {}).get("steerability", {}).get(name)
        if base:
            rho = base["spearman"]
            _level_line(ax, base["levels"], f"prompt baseline (rho {rho if rho is None else f'{rho:.2f}'})", "--s",
                        0.04 * len(sizes) / 2)
        ax.set_title(name)
        ax.set_xlabel("requested")
        ax.set_ylabel("measured (mean, 95% CI)")
        ax.set_xticks(range(lo, hi + 1))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_crosstalk(crosstalk: dict[str, dict[str, float | None]], path: Path, title: str) -> None:
    plt = _pyplot()
    rows = list(crosstalk)
    cols = list(next(iter(crosstalk.values()), {}))
    m = np.array([[np.nan if crosstalk[r].get(c) is None else crosstalk[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 1.0 * len(rows) + 1.5))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("measured attribute")
    ax.set_ylabel("varied attribute")
    for i in range(len(rows)):
        for j in range(len(cols)):
            dark = not np.isnan(m[i, j]) and abs(m[i, j]) > 0.6  # white text on the deep colours
            ax.text(j, i, "n/a" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="Spearman")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Writes every plot into ``out``; returns their file names."""
    written = []
    largest = list(report["best_of"])[-1]
    for j, judge in enumerate(report["judges"]):
        name = "steerability.png" if j == 0 else f"steerability-judge-{j + 1}.png"
        role = "primary judge" if j == 0 else f"judge {j + 1}"
        plot_steerability(judge, out / name, f"Requested vs measured ({role}: {Path(judge['apm']).name})")
        written.append(name)
    plot_crosstalk(report["crosstalk"], out / "crosstalk.png",
                   f"Cross-talk at best-of-{largest} (primary judge)")
    written.append("crosstalk.png")
    return written
