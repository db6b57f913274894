"""The component-study report: rows x budgets (mean ± std over seeds), each row against Baseline on the same
seeds with a bootstrap interval, a Holm-corrected test and a verdict (or why none can be given: one seed, or a
component that did not act), class-wise IoU change, as Markdown, Parquet and figures. Built from trial records
alone (dicts with row, budget, seed, miou, ``iou/<class>``, ``acted/*`` and optionally the per-image
confusions), so the study and the MLflow-only ``mlflow/report.py`` share it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segsde.data.labels import CLASS_NAMES
from segsde.data.store import atomic_savefig, atomic_write_bytes
from segsde.orchestration.comparison import BASELINE, comparison_markdown, comparison_table, forest_figure

MISSING = "failed/missing"


def trial_frame(records: list[dict]) -> pd.DataFrame:
    """One row per trial: row, budget, seed, miou (%), and one column per class IoU (%); failed trials
    (no miou) are kept with NaN so the tables can mark the cell."""
    out = []
    for r in records:
        item = {"row": r["row"], "budget": int(r["budget"]), "seed": int(r["seed"]),
                "miou": 100 * r["miou"] if r.get("miou") is not None else np.nan}
        item.update({c: 100 * r[f"iou/{c}"] if r.get(f"iou/{c}") is not None else np.nan for c in CLASS_NAMES})
        out.append(item)
    return pd.DataFrame(out, columns=["row", "budget", "seed", "miou", *CLASS_NAMES])


def study_table(trials: pd.DataFrame, rows: list[str], budgets: list[int]) -> pd.DataFrame:
    """Mean, std and count of mIoU per (row, budget) in study order, with the delta to Baseline's mean."""
    stats = trials.groupby(["row", "budget"])["miou"].agg(["mean", "std", "count"]).reset_index()
    cells = pd.DataFrame([(r, b) for r in rows for b in budgets], columns=["row", "budget"]).merge(stats, how="left")
    base = cells[cells.row == BASELINE].set_index("budget")["mean"]
    cells["delta"] = cells["mean"] - cells["budget"].map(base)
    cells["count"] = cells["count"].fillna(0).astype(int)
    return cells


def class_table(trials: pd.DataFrame, rows: list[str], budget: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-row mean class IoU at ``budget`` (rows x classes), and its same-seed change over Baseline: mean and
    sd over the shared seeds."""
    at = trials[trials.budget == budget]
    means = at.groupby("row")[list(CLASS_NAMES)].mean().reindex([r for r in rows if r in set(at.row)])
    if BASELINE not in means.index:
        return means, means * np.nan, means * np.nan
    base = at[at.row == BASELINE].set_index("seed")[list(CLASS_NAMES)]
    changes = {r: g.set_index("seed")[list(CLASS_NAMES)].sub(base).dropna(how="all") for r, g in at.groupby("row")}
    delta = pd.DataFrame({r: changes[r].mean() for r in means.index}).T.reindex(means.index)
    spread = pd.DataFrame({r: changes[r].std() for r in means.index}).T.reindex(means.index)
    return means, delta, spread


def markdown(table: pd.DataFrame, rows: list[str], budgets: list[int], silent: set = frozenset()) -> str:
    """The study table: a row per study row, a column per budget, "mean ± std (delta)"; missing cells marked,
    and cells whose component did not act (``silent``: (row, budget)) say so instead of a delta."""
    lines = ["| row | " + " | ".join(f"{b} labels" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    cell = table.set_index(["row", "budget"])
    for r in rows:
        parts = []
        for b in budgets:
            c = cell.loc[(r, b)]
            if c["count"] == 0:
                parts.append(MISSING)
                continue
            text = f"{c['mean']:.2f}" + (f" ± {c['std']:.2f}" if c["count"] > 1 else "") + f" (n={int(c['count'])})"
            if (r, b) in silent:
                text += " (component did not act)"
            elif r != BASELINE and c["delta"] == c["delta"]:
                text += f" {c['delta']:+.2f}"
            parts.append(text)
        lines.append(f"| {r} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def class_markdown(means: pd.DataFrame, delta: pd.DataFrame, spread: pd.DataFrame, budget: int) -> str:
    head = "| row | " + " | ".join(CLASS_NAMES) + " |"
    lines = [f"Class IoU (%) at {budget} labels; in brackets the same-seed change over Baseline, mean ± sd over seeds", "", head,
             "|---|" + "---|" * len(CLASS_NAMES)]
    for r in means.index:
        vals = []
        for c in CLASS_NAMES:
            text = "-" if np.isnan(means.loc[r, c]) else f"{means.loc[r, c]:.1f}"
            if r != BASELINE and not np.isnan(delta.loc[r, c]):
                text += f" ({delta.loc[r, c]:+.1f}" + ("" if np.isnan(spread.loc[r, c]) else f" ± {spread.loc[r, c]:.1f}") + ")"
            vals.append(text)
        lines.append(f"| {r} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def bar_figure(table: pd.DataFrame, rows: list[str], budgets: list[int]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) * max(1, len(budgets))), 4))
    width = 0.8 / len(budgets)
    cell = table.set_index(["row", "budget"])
    for k, b in enumerate(budgets):
        means = [cell.loc[(r, b), "mean"] for r in rows]
        stds = [np.nan_to_num(cell.loc[(r, b), "std"]) for r in rows]
        ax.bar(np.arange(len(rows)) + k * width, np.nan_to_num(means), width, yerr=stds, capsize=3, label=f"{b} labels")
        for x, m in zip(np.arange(len(rows)) + k * width, means):
            if np.isnan(m):
                ax.text(x, 0.5, "x", ha="center", color="red")  # a failed or missing cell
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, rows, rotation=30, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Component study: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    return fig


def heatmap_figure(delta: pd.DataFrame, budget: int):
    """The paper's class-wise figure: IoU change over Baseline per class and row."""
    import matplotlib.pyplot as plt

    shown = delta.drop(index=BASELINE, errors="ignore")
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * max(1, len(shown))))
    values = shown.to_numpy(dtype=float)
    limit = max(1.0, float(np.nanmax(np.abs(values)))) if values.size and not np.all(np.isnan(values)) else 1.0
    image = ax.imshow(values if values.size else np.zeros((1, len(CLASS_NAMES))), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=60, ha="right")
    ax.set_yticks(range(len(shown)), shown.index)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="IoU change over Baseline (points)")
    ax.set_title(f"Class-wise IoU change over Baseline at {budget} labels")
    fig.tight_layout()
    return fig


def write_report(records: list[dict], rows: list[str], budgets: list[int], out: Path, logger=None) -> tuple[str, str]:
    """Write study.md, study.parquet, comparison.parquet, trials.parquet, class_iou.parquet and the figures
    under ``out`` (and into the MLflow run of ``logger``, with the comparison as metrics); return the Markdown,
    and its summary for a terminal (the study table and the comparisons, without the class tables)."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = trial_frame(records)
    table = study_table(trials, rows, budgets)
    comparison = comparison_table(records, rows, budgets)
    silent = {(c.row, c.budget) for c in comparison.itertuples() if not c.acted}
    text = ["# Component study (mIoU %, mean ± std over seeds, delta to Baseline)", "", markdown(table, rows, budgets, silent)]
    summary, classes = list(text), []
    figures = [(bar_figure(table, rows, budgets), "study_bars.png"), (forest_figure(comparison, budgets), "forest.png")]
    for b in budgets:
        means, delta, spread = class_table(trials, rows, b)
        text += ["", comparison_markdown(comparison, b), "", class_markdown(means, delta, spread, b)]
        summary += ["", comparison_markdown(comparison, b)]
        classes.append(means.assign(budget=b).reset_index())
        figures.append((heatmap_figure(delta, b), f"class_iou_delta_b{b}.png"))
    markdown_text = "\n".join(text) + "\n"
    atomic_write_bytes(out / "study.md", markdown_text.encode())
    frames = [("study.parquet", table), ("comparison.parquet", comparison), ("trials.parquet", trials),
              ("class_iou.parquet", pd.concat(classes) if classes else pd.DataFrame())]
    for name, frame in frames:
        tmp = out / f".{name}.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(out / name)
    for fig, name in figures:
        atomic_savefig(fig, out / name)
        if logger is not None:
            logger.figure(fig, f"study/{name}")
        plt.close(fig)
    if logger is not None:
        for name in ["study.md", *(name for name, _ in frames)]:
            logger.artifact(out / name, "study")
        logger.metrics({f"compare/{c.row}/b{c.budget}/{k}": getattr(c, k) for c in comparison.itertuples() if c.row != BASELINE
                        for k in ("delta", "ci_low", "ci_high", "p_holm") if getattr(c, k) == getattr(c, k)}, step=0)
    return markdown_text, "\n".join(summary)
