"""What a person looks at after a selection: its class make-up against the pool, and its score parts."""

from __future__ import annotations

import numpy as np

from segsde.data.labels import CLASS_COLORS, CLASS_NAMES


def class_histogram(pool_pixels: np.ndarray, selected_pixels: np.ndarray, budgets: list[int], method: str):
    """Pixel share per class of the pool and of the selected prefixes (rows of ``selected_pixels``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    x = np.arange(len(CLASS_NAMES))
    bars = [("pool", pool_pixels)] + [(f"first {b}", row) for b, row in zip(budgets, selected_pixels)]
    width = 0.8 / len(bars)
    for k, (name, counts) in enumerate(bars):
        share = counts / max(counts.sum(), 1)
        ax.bar(x + k * width, share, width, label=name, color="0.3" if k == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(x + 0.4 - width / 2, CLASS_NAMES, rotation=60, ha="right")
    for tick, color in zip(ax.get_xticklabels(), CLASS_COLORS):
        tick.set_color(tuple(np.minimum(color / 255, 0.8)))
    ax.set_ylabel("pixel share (log)")
    ax.set_title(f"'{method}' selection: class pixel share of the selected prefixes vs the pool")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    return fig


def score_parts(records: list[dict], budgets: list[int], weight: float, method: str):
    """Per pick, in order: distance to the selected set, weight x difficulty, entropy (what applies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    rank = np.arange(len(records))
    parts = [("distance to the selected set", [r["distance"] for r in records], 1.0),
             (f"{weight:g} x difficulty E", [r["difficulty"] for r in records], weight),
             ("mean pixel entropy", [r["entropy"] for r in records], 1.0)]
    plotted = False
    for name, values, scale in parts:
        v = np.array([np.nan if x is None else x * scale for x in values], dtype=float)
        if np.isfinite(v).any():
            ax.plot(rank, v, ".", ms=4, label=name)
            plotted = True
    for b in budgets[:-1]:
        ax.axvline(b - 0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("rank in the selection (dashed: round boundaries)")
    ax.set_ylabel("score part at pick time")
    ax.set_title(f"'{method}' selection: score parts per round")
    if plotted:
        ax.legend(fontsize=8)
    else:  # random picks have no scores
        ax.text(0.5, 0.5, "no score parts: a seeded random order", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return fig
