"""Each study row against Baseline, and any two rows against each other (``pairs``, the paper's orderings such as
DepthMix > ClassMix): did the components act, how large is the same-seed difference, how sure are we (paired
t-interval over seeds with the shared validation images' variance, Holm-corrected over the study's family), and
how many seeds a stated minimal effect would need."""

from __future__ import annotations

import numpy as np
import pandas as pd

from segsde.metrics.segmentation import decode_confusions
from segsde.orchestration.statistics import ALPHA, LEVEL, POWER, holm, paired_difference, seeds_for

BASELINE = "baseline"
# reported beside the family, never in it: the upper bound, the positive control and the A/A negative control
CONTROLS = ("all_labels", "transfer_oracle", "baseline_aa")
MIN_EFFECT = 1.0   # mIoU points: the smallest difference a study is planned to find (the profile's study.min_effect)
# a teacher row acts when pseudo-labels carry gradient: enough confident pool pixels, a mix that pastes
# something, and a pseudo-label loss that is not negligible beside the supervised one (second half of training)
MIN_CONFIDENT, MIN_MIXED, MIN_LOSS_RATIO = 0.05, 0.02, 0.01
# a multi-task row acts when its depth loss and its feature exchange each carry at least this share
MIN_SHARE = 0.01
COLUMNS = ["row", "reference", "budget", "n", "mean", "sd", "delta", "sd_delta", "image_var", "se", "df", "ci_low", "ci_high", "p",
           "p_holm", "method", "control", "seeds_needed", "teacher_minus_student", "acted", "verdict", "note"]


def inaction(records: list[dict]) -> str | None:
    """A plain sentence when the row's component did not act in its trials (means over seeds), else None. Each
    component has its check: teacher rows their confident pixels, mix and pseudo-label loss; multi-task rows the
    depth loss's share and the feature exchange; transfer rows the encoder they started from; selection rows their
    overlap with random's labels."""
    def mean(key):
        values = [r[key] for r in records if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    confident, mixed, ratio = mean("acted/confident_fraction"), mean("acted/mixed_area"), mean("acted/unsup_ratio")
    depth, exchange = mean("acted/depth_share"), mean("acted/exchange")
    transferred, overlap = mean("acted/encoder_from_sde"), mean("acted/random_overlap")
    if confident is not None and confident < MIN_CONFIDENT:
        return (f"did not act: {100 * confident:.1f} % of the unlabeled pool pixels were confident over the second half of "
                f"training (under {100 * MIN_CONFIDENT:.0f} %)")
    if mixed is not None and mixed < MIN_MIXED:
        return f"did not act: the mix pasted {100 * mixed:.1f} % of the pixels (under {100 * MIN_MIXED:.0f} %)"
    if ratio is not None and ratio < MIN_LOSS_RATIO:
        return f"did not act: its pseudo-label loss was {100 * ratio:.2f} % of the supervised loss (under {100 * MIN_LOSS_RATIO:.0f} %)"
    if depth is not None and depth < MIN_SHARE:
        return f"did not act: the depth loss was {100 * depth:.2f} % of the loss (under {100 * MIN_SHARE:.0f} %)"
    if exchange is not None and exchange < MIN_SHARE:
        return f"did not act: the feature exchange added {100 * exchange:.2f} % to the segmentation features (under {100 * MIN_SHARE:.0f} %)"
    if transferred is not None and transferred < 1:
        return f"did not act: {100 * transferred:.0f} % of the encoder's tensors started from the SDE weights"
    if overlap is not None and overlap >= 1:
        return "did not act: the selection labeled the same images as random at this budget and seed"
    return None


def comparison_table(records: list[dict], rows: list[str], budgets: list[int], min_effect: float = MIN_EFFECT,
                     controls=CONTROLS, pairs: tuple[tuple[str, str], ...] = ()) -> pd.DataFrame:
    """One line per (row, budget), then one per (pair, budget): mIoU mean and sd over seeds, the paired difference to
    ``reference`` (Baseline, or the pair's second row) with its interval (``method`` names it and its n), the p-value
    Holm-adjusted over every judged line of every budget, pairs included (``controls`` are judged beside that family
    at their own level), the seeds ``min_effect`` needs, and the verdict."""
    done = [r for r in records if r.get("miou") is not None]
    lines = []
    for b in budgets:
        at = {row: [r for r in done if r["row"] == row and int(r["budget"]) == b] for row in rows}
        for row in rows:
            lines.append(_line(at[row], at.get(BASELINE, []), row, "" if row == BASELINE else BASELINE, b, row in controls))
        for row, reference in pairs:
            lines.append(_line(at[row], at[reference], row, reference, b, False))
    table = pd.DataFrame(lines).reindex(columns=COLUMNS)
    _judge(table, min_effect)
    table.attrs["min_effect"] = min_effect
    return table


def _line(recs: list[dict], reference_recs: list[dict], row: str, reference: str, budget: int, control: bool) -> dict:
    """``row``'s trials at ``budget`` and their paired difference to ``reference``'s ("": the reference itself)."""
    silent = inaction(recs)
    if reference and reference != BASELINE:  # a comparison between two components needs both to have acted
        silent_reference = inaction(reference_recs)
        if silent or silent_reference:
            silent = f"{row} {silent}" if silent else f"{reference} {silent_reference}"
    scores = {int(r["seed"]): 100 * r["miou"] for r in recs}
    line = {"row": row, "reference": reference, "budget": budget, "n": len(recs),
            "mean": np.mean(list(scores.values())) if recs else np.nan,
            "sd": np.std(list(scores.values()), ddof=1) if len(recs) > 1 else np.nan, "acted": silent is None, "control": control}
    teacher = [100 * (r["teacher_miou"] - r["miou"]) for r in recs if r.get("teacher_miou") is not None]
    line["teacher_minus_student"] = float(np.mean(teacher)) if teacher else np.nan
    paired = None
    if reference and recs and reference_recs:
        (conf, groups), (reference_conf, _) = record_confusions(recs), record_confusions(reference_recs)
        paired = paired_difference(scores, {int(r["seed"]): 100 * r["miou"] for r in reference_recs}, conf, reference_conf, groups)
    if paired is not None:
        line.update(n=paired.n, delta=paired.delta, sd_delta=paired.sd, method=paired.method, image_var=paired.image_var,
                    **(dict(se=paired.se, df=paired.df, ci_low=paired.low, ci_high=paired.high, p=paired.p) if paired.n >= 2 else {}))
    line["verdict"] = (silent or "") if reference else "reference"
    no_depth = sorted({int(r["seed"]) for r in recs + (reference_recs if reference != BASELINE else []) if r.get("sde/learned") is False})
    line["note"] = (f"the SDE model of seed{'s' if len(no_depth) > 1 else ''} {', '.join(map(str, no_depth))} learned no depth"
                    if no_depth else "")  # see sde_quality
    return line


def _judge(table: pd.DataFrame, min_effect: float) -> None:
    """Holm over the study's judged rows (n >= 2, component acted, not a control) across budgets, controls at their
    own level, the verdicts, and the seeds the planner asks for ``min_effect`` at Holm's first-step level."""
    judged = (table.n >= 2) & table.p.notna() & table.acted
    family = judged & ~table.control.astype(bool)
    if family.any():
        table.loc[family, "p_holm"] = holm(table.loc[family, "p"].tolist())
    table.loc[judged & table.control.astype(bool), "p_holm"] = table.p  # beside the family: unadjusted
    size = max(int(((table.reference != "") & ~table.control.astype(bool)).sum()), 1)  # the family once every line is judged
    for b in table.budget.unique():
        one_seed = (table.budget == b) & (table.n == 1) & table.delta.notna() & (table.reference == BASELINE)
        # with one seed the spread of the rows' differences stands in for the training noise
        spread = table.loc[one_seed, "delta"].std() if one_seed.sum() > 2 else np.nan
        for i in table.index[(table.budget == b) & table.delta.notna()]:
            sd = table.at[i, "sd_delta"] if table.at[i, "n"] >= 2 else spread
            alpha = ALPHA if table.at[i, "control"] else ALPHA / size
            table.at[i, "seeds_needed"] = seeds_for(min_effect, sd, np.nan_to_num(table.at[i, "image_var"]), alpha=alpha)
    for i in table.index[table.delta.notna()]:
        if table.at[i, "verdict"]:
            continue
        if table.at[i, "n"] < 2:
            table.at[i, "verdict"] = "one seed: no difference can be judged"
        elif table.at[i, "p_holm"] < ALPHA and (table.at[i, "ci_low"] > 0 or table.at[i, "ci_high"] < 0):
            than = "Baseline" if table.at[i, "reference"] == BASELINE else table.at[i, "reference"]
            table.at[i, "verdict"] = f"better than {than}" if table.at[i, "delta"] > 0 else f"worse than {than}"
        else:
            table.at[i, "verdict"] = "no difference shown"
    table.loc[table.n == 0, "verdict"] = "failed/missing"


def record_confusions(records: list[dict]) -> tuple[dict[int, np.ndarray] | None, list | None]:
    """{seed: per-image confusions} of the records that kept them, and the images' resampling units (a Cityscapes
    city; on the testbed every image its own) where the trial recorded them."""
    kept = [r for r in records if r.get("per_image_confusion")]
    found = {int(r["seed"]): decode_confusions(r["per_image_confusion"]) for r in kept}
    groups = next((r["per_image_confusion"].get("groups") for r in kept if r["per_image_confusion"].get("groups")), None)
    return found or None, groups


def against_baseline(table: pd.DataFrame) -> pd.DataFrame:
    """The table's lines of the rows themselves (Baseline and each row against it), without the pairs."""
    return table[table.reference.isin(["", BASELINE])]


def comparison_markdown(table: pd.DataFrame, budget: int) -> str:
    at = table[table.budget == budget]
    family = int((table.p_holm.notna() & ~table.control.astype(bool)).sum())
    methods = sorted({m for m in at.method.dropna() if "n=1 " not in m})
    controls = ", ".join(at.row[at.control.astype(bool)])
    holm_note = (f"two-sided p Holm-corrected over the study's {family} judged rows"
                 + (f" ({controls}: controls, beside the family at their own level)" if controls else "")) if family else "no row judged"
    pairs = ' (a line "A vs B": A against B)' if len(against_baseline(at)) < len(at) else ""
    lines = [f"Against Baseline{pairs} at {budget} labels: same-seed difference Δ in mIoU points with its {100 * LEVEL:.0f} % interval "
             f"({'; '.join(methods) or 'none: one seed'}); {holm_note}; seeds for {100 * POWER:.0f} % power to find "
             f"{table.attrs.get('min_effect', MIN_EFFECT):g} points", "",
             "| row | n | mIoU | Δ | 95 % interval | p (Holm) | seeds needed | teacher − student | verdict |", "|---" * 9 + "|"]
    for _, c in at.iterrows():
        def num(v, fmt):
            return "–" if v is None or v != v else format(v, fmt)
        shown = bool(c.reference) and c.acted and c.n > 0
        mean = "–" if c.n == 0 else f"{c['mean']:.2f}" + (f" ± {c['sd']:.2f}" if c.n > 1 else "")
        interval = f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]" if shown and c.n >= 2 and c.ci_low == c.ci_low else "–"
        name = line_name(c.row, c.reference, c.control)
        lines.append(f"| {name} | {c.n} | {mean} | {num(c.delta, '+.2f') if shown else '–'} | {interval} | "
                     f"{num(c.p_holm, '.3f') if shown else '–'} | {num(c.seeds_needed, '.0f') if shown else '–'} | "
                     f"{num(c.teacher_minus_student, '+.2f')} | {c.verdict}{f' ({c.note})' if c.note else ''} |")
    per_seed = table.attrs.get("sde_per_seed")
    if per_seed is not None and (at.n > 1).any():
        lines += ["", "Rows that read the SDE model: " + ("each seed trained its own SDE model, so their intervals cover the SDE "
                                                          "stage's randomness too." if per_seed else
                                                          "one SDE model served every seed, so their intervals are conditional "
                                                          "on that SDE run (--sde-per-seed covers it).")]
    if ((at.n == 1) & at.delta.notna()).any():
        lines += ["", "With one seed a difference cannot be told from training noise; the seeds needed take the spread of the "
                      "rows' differences as that noise. Run more seeds (--seeds 0,1,2,...), or plan them with --plan."]
    return "\n".join(lines)


def line_name(row: str, reference: str, control: bool = False) -> str:
    """How a comparison line is named: its row, "(control)" for controls, "A vs B" for a pair."""
    if reference and reference != BASELINE:
        return f"{row} vs {reference}"
    return f"{row} (control)" if control else row


def forest_figure(table: pd.DataFrame, budgets: list[int]):
    """Each row's difference to Baseline (and each pair's, A - B) with its interval, a panel per budget; lines that did not act or have
    one seed are drawn hollow and named so."""
    import matplotlib.pyplot as plt

    lines = int((table.budget == budgets[0]).sum()) if budgets else 1
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 0.5 + 0.45 * lines), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        at = table[(table.budget == b) & (table.reference != "")].reset_index(drop=True)
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
        ax.set_yticks(range(len(at)), [line_name(r, ref, c) for r, ref, c in zip(at.row, at.reference, at.control.astype(bool))])
        ax.invert_yaxis()
        ax.set_xlabel("mIoU difference to Baseline, or A - B (points)" if (at.reference != BASELINE).any()
                      else "mIoU difference to Baseline (points)")
        seeds = int(at.n.max()) if len(at) else 0
        ax.set_title(f"{b} labels: same-seed Δ to Baseline\n{100 * LEVEL:.0f} % paired t-interval, n={seeds} seeds" if seeds > 1
                     else f"{b} labels: same-seed Δ to Baseline\none seed (no interval)", fontsize=10)
    fig.tight_layout()
    return fig
