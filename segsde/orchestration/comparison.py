"""Each study row against Baseline: did its component act, how large is the same-seed difference, how sure are
we (bootstrap interval, Holm-corrected test), and how many seeds a judgement would need."""

from __future__ import annotations

import numpy as np
import pandas as pd

from segsde.metrics.segmentation import decode_confusions
from segsde.orchestration.statistics import ALPHA, POWER, holm, paired_difference, seeds_needed

BASELINE = "baseline"
# a teacher row acts when pseudo-labels carry gradient: enough confident pool pixels, a mix that pastes
# something, and a pseudo-label loss that is not negligible beside the supervised one (second half of training)
MIN_CONFIDENT, MIN_MIXED, MIN_LOSS_RATIO = 0.05, 0.02, 0.01
COLUMNS = ["row", "budget", "n", "mean", "sd", "delta", "sd_delta", "ci_low", "ci_high", "p", "p_holm", "images",
           "seeds_needed", "teacher_minus_student", "acted", "verdict"]


def inaction(records: list[dict]) -> str | None:
    """A plain sentence when the row's component did not act in its trials (means over seeds), else None."""
    def mean(key):
        values = [r[key] for r in records if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    confident, mixed, ratio = mean("acted/confident_fraction"), mean("acted/mixed_area"), mean("acted/unsup_ratio")
    if confident is not None and confident < MIN_CONFIDENT:
        return (f"did not act: {100 * confident:.1f} % of the pool pixels were confident over the second half of training "
                f"(under {100 * MIN_CONFIDENT:.0f} %)")
    if mixed is not None and mixed < MIN_MIXED:
        return f"did not act: the mix pasted {100 * mixed:.1f} % of the pixels (under {100 * MIN_MIXED:.0f} %)"
    if ratio is not None and ratio < MIN_LOSS_RATIO:
        return f"did not act: its pseudo-label loss was {100 * ratio:.2f} % of the supervised loss (under {100 * MIN_LOSS_RATIO:.0f} %)"
    return None


def comparison_table(records: list[dict], rows: list[str], budgets: list[int]) -> pd.DataFrame:
    """One line per (row, budget): mIoU mean and sd over seeds, the paired difference to Baseline with its
    interval and Holm-adjusted p-value, the seeds a judgement needs, and the verdict."""
    done = [r for r in records if r.get("miou") is not None]
    lines = []
    for b in budgets:
        at = {row: [r for r in done if r["row"] == row and int(r["budget"]) == b] for row in rows}
        base = at.get(BASELINE, [])
        for row in rows:
            recs, silent = at[row], inaction(at[row])
            scores = {int(r["seed"]): 100 * r["miou"] for r in recs}
            line = {"row": row, "budget": b, "n": len(recs), "mean": np.mean(list(scores.values())) if recs else np.nan,
                    "sd": np.std(list(scores.values()), ddof=1) if len(recs) > 1 else np.nan, "acted": silent is None}
            teacher = [100 * (r["teacher_miou"] - r["miou"]) for r in recs if r.get("teacher_miou") is not None]
            line["teacher_minus_student"] = float(np.mean(teacher)) if teacher else np.nan
            paired = None
            if row != BASELINE and recs and base:
                paired = paired_difference(scores, {int(r["seed"]): 100 * r["miou"] for r in base}, _confusions(recs), _confusions(base))
            if paired is not None:  # one seed: an interval over validation images alone would hide the training noise
                line.update(n=paired.n, delta=paired.delta, sd_delta=paired.sd, images=paired.images,
                            **(dict(ci_low=paired.low, ci_high=paired.high, p=paired.p) if paired.n >= 2 else {}))
            line["verdict"] = "reference" if row == BASELINE else (silent or "")
            lines.append(line)
    table = pd.DataFrame(lines).reindex(columns=COLUMNS)
    for b in budgets:
        _judge(table, table.budget == b)
    return table


def _judge(table: pd.DataFrame, at: pd.Series) -> None:
    """Holm over the budget's judged rows (n >= 2, component acted), the verdicts and the seeds needed."""
    judged = at & (table.n >= 2) & table.delta.notna() & table.acted
    if judged.any():
        table.loc[judged, "p_holm"] = holm(table.loc[judged, "p"].tolist())
    one_seed = at & (table.n == 1) & table.delta.notna()
    spread = table.loc[one_seed, "delta"].std() if one_seed.sum() > 2 else np.nan  # rows' spread standing in for the noise
    for i in table.index[at & table.delta.notna()]:
        sd = table.at[i, "sd_delta"] if table.at[i, "n"] >= 2 else spread
        table.at[i, "seeds_needed"] = seeds_needed(table.at[i, "delta"], sd)
        if table.at[i, "verdict"]:
            continue
        if table.at[i, "n"] < 2:
            table.at[i, "verdict"] = "one seed: no difference can be judged"
        elif table.at[i, "p_holm"] < ALPHA and (table.at[i, "ci_low"] > 0 or table.at[i, "ci_high"] < 0):
            table.at[i, "verdict"] = "better than Baseline" if table.at[i, "delta"] > 0 else "worse than Baseline"
        else:
            table.at[i, "verdict"] = "no difference shown"
    missing = at & (table.n == 0)
    table.loc[missing, "verdict"] = "failed/missing"


def _confusions(records: list[dict]) -> dict[int, np.ndarray] | None:
    found = {int(r["seed"]): decode_confusions(r["per_image_confusion"]) for r in records if r.get("per_image_confusion")}
    return found or None


def comparison_markdown(table: pd.DataFrame, budget: int) -> str:
    at = table[table.budget == budget]
    lines = [f"Against Baseline at {budget} labels: same-seed difference in mIoU points, 95 % bootstrap interval over seeds "
             f"and validation images, two-sided p Holm-corrected over the rows, seeds for {100 * POWER:.0f} % power at this difference", "",
             "| row | n | mIoU | Δ | 95 % interval | p (Holm) | seeds needed | teacher − student | verdict |", "|---" * 9 + "|"]
    for _, c in at.iterrows():
        def num(v, fmt):
            return "–" if v is None or v != v else format(v, fmt)
        shown = c.row != BASELINE and c.acted and c.n > 0
        mean = "–" if c.n == 0 else f"{c['mean']:.2f}" + (f" ± {c['sd']:.2f}" if c.n > 1 else "")
        interval = f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]" if shown and c.n >= 2 and c.ci_low == c.ci_low else "–"
        lines.append(f"| {c.row} | {c.n} | {mean} | {num(c.delta, '+.2f') if shown else '–'} | {interval} | "
                     f"{num(c.p_holm, '.3f') if shown else '–'} | {num(c.seeds_needed, '.0f') if shown else '–'} | "
                     f"{num(c.teacher_minus_student, '+.2f')} | {c.verdict} |")
    if ((at.n == 1) & at.delta.notna()).any():
        lines += ["", "With one seed a difference cannot be told from training noise; the seeds needed take the spread of the "
                      "rows' differences as that noise. Run more seeds (--seeds 0,1,2,...)."]
    return "\n".join(lines)


def forest_figure(table: pd.DataFrame, budgets: list[int]):
    """Each row's difference to Baseline with its interval, a panel per budget; rows that did not act or have
    one seed are drawn hollow and named so."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 0.5 + 0.45 * table.row.nunique()), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        at = table[(table.budget == b) & (table.row != BASELINE)].reset_index(drop=True)
        for y, c in at.iterrows():
            if c.delta != c.delta:
                continue
            solid = c.acted and c.n >= 2
            if c.n >= 2 and c.ci_low == c.ci_low:
                ax.plot([c.ci_low, c.ci_high], [y, y], color="C0" if solid else "0.6")
            ax.plot(c.delta, y, "o", color="C0" if solid else "0.6", fillstyle="full" if solid else "none")
            note = "did not act" if not c.acted else "one seed" if c.n < 2 else ""
            ax.text(c.delta, y + 0.3, note, fontsize=7, color="0.4", ha="center")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(at)), at.row)
        ax.invert_yaxis()
        ax.set_xlabel("mIoU difference to Baseline (points)")
        ax.set_title(f"{b} labels: same-seed difference, 95 % interval")
    fig.tight_layout()
    return fig
