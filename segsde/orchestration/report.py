"""The component-study report: rows x budgets (mean ± std over seeds), each row against Baseline on the same
seeds with a paired t-interval, a Holm-corrected test and a verdict (or why none can be given: one seed, or a
component that did not act), class-wise IoU change, as Markdown, Parquet and figures. Built from trial records
alone (dicts with row, budget, seed, miou, ``iou/<class>``, ``acted/*`` and optionally the per-image
confusions), so the study and the MLflow-only ``mlflow/report.py`` share it. trials.parquet keeps every record
whole and the report's settings, so that ``segsde report --from DIR`` rebuilds all of it without the study's storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from segsde.data.labels import CLASS_NAMES
from segsde.data.store import atomic_savefig, atomic_write_bytes
from segsde.errors import SegSDEError
from segsde.orchestration.claims import claim_verdicts, claims_markdown
from segsde.orchestration.comparison import BASELINE, MIN_EFFECT, against_baseline, comparison_markdown, comparison_table, forest_figure
from segsde.orchestration.sde_quality import learned_depth, sde_models_markdown

MISSING = "failed/missing"
SETTINGS = b"segsde.report"  # trials.parquet's metadata key: write_report's settings, for a rebuild


def trial_frame(records: list[dict]) -> pd.DataFrame:
    """One row per trial: row, budget, seed, miou (%), one column per class IoU (%), the activity checks and the SDE
    model's quality where the trial has them, and ``record``: the whole record as JSON (what a rebuild reads).
    Failed trials (no miou) are kept with NaN so the tables can mark the cell."""
    out = []
    for r in records:
        item = {"row": r["row"], "budget": int(r["budget"]), "seed": int(r["seed"]),
                "miou": 100 * r["miou"] if r.get("miou") is not None else np.nan}
        item.update({c: 100 * r[f"iou/{c}"] if r.get(f"iou/{c}") is not None else np.nan for c in CLASS_NAMES})
        item.update({k: v for k, v in r.items() if k.startswith(("acted/", "sde/")) or k in ("teacher_miou", "seconds")})
        item["record"] = json.dumps(r, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        out.append(item)
    extra = sorted({k for item in out for k in item} - {"row", "budget", "seed", "miou", "record", *CLASS_NAMES})
    return pd.DataFrame(out, columns=["row", "budget", "seed", "miou", *CLASS_NAMES, *extra, "record"])


def read_trials(folder: Path) -> tuple[list[dict], dict]:
    """The trial records and report settings that ``write_report`` kept in ``folder``/trials.parquet."""
    import pyarrow.parquet as pq

    path = Path(folder) / "trials.parquet"
    if not path.is_file():
        raise SegSDEError(f"{path} does not exist: pass --from the folder of a study's report (OUT/study/<profile>-<key>)")
    table = pq.read_table(path)
    settings = (table.schema.metadata or {}).get(SETTINGS)
    if settings is None or "record" not in table.column_names:
        raise SegSDEError(f"{path} was written before reports kept their trials whole: rerun the study (its trials are cached)")
    records = [json.loads(r) for r in table.column("record").to_pylist()]
    settings = json.loads(settings)
    settings["pairs"] = tuple(tuple(p) for p in settings.get("pairs", ()))
    return records, settings


def rebuild_report(source: Path, out: Path | None = None) -> tuple[str, str]:
    """``segsde report --from``: every table and figure of a report again, from its trials.parquet alone."""
    records, settings = read_trials(source)
    return write_report(records, out=Path(out or source), **settings)


def study_table(trials: pd.DataFrame, rows: list[str], budgets: list[int], comparison: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of mIoU per (row, budget) in study order, with the comparison's same-seed difference to
    Baseline (the one delta of the report: a difference of means would disagree with it when a seed failed)."""
    stats = trials.groupby(["row", "budget"])["miou"].agg(["mean", "std", "count"]).reset_index()
    cells = pd.DataFrame([(r, b) for r in rows for b in budgets], columns=["row", "budget"]).merge(stats, how="left")
    cells = cells.merge(against_baseline(comparison)[["row", "budget", "delta"]], how="left")
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


def seed_markdown(trials: pd.DataFrame, rows: list[str], budget: int) -> str:
    """Every trial's mIoU at ``budget``: a row per study row, a column per seed (the pairs the comparisons use)."""
    at = trials[trials.budget == budget]
    seeds = sorted(at.seed.unique())
    cell = at.set_index(["row", "seed"])["miou"]
    lines = [f"Every trial's mIoU (%) at {budget} labels, by seed", "", "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for r in rows:
        values = [cell.get((r, s), np.nan) for s in seeds]
        lines.append(f"| {r} | " + " | ".join(MISSING if v != v else f"{v:.2f}" for v in values) + " |")
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
    """mIoU per row and budget with its spread over seeds, each bar labelled, Baseline's level dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) * max(1, len(budgets))), 4.5))
    width = 0.8 / len(budgets)
    cell = table.set_index(["row", "budget"])
    for k, b in enumerate(budgets):
        means = np.array([cell.loc[(r, b), "mean"] for r in rows], dtype=float)
        stds = np.nan_to_num([cell.loc[(r, b), "std"] for r in rows])
        xs = np.arange(len(rows)) + k * width
        bars = ax.bar(xs, np.nan_to_num(means), width, yerr=stds, capsize=3, label=f"{b} labels")
        if BASELINE in rows and means[rows.index(BASELINE)] == means[rows.index(BASELINE)]:
            ax.axhline(means[rows.index(BASELINE)], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
        for x, m, sd in zip(xs, means, stds):
            ax.text(x, 0.5 if np.isnan(m) else m + sd + 0.3, "failed" if np.isnan(m) else f"{m:.1f}", ha="center",
                    va="bottom", fontsize=8, color="red" if np.isnan(m) else "black")
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, rows, rotation=30, ha="right")
    ax.set_ylabel("mIoU (%)")
    seeds = int(table["count"].max()) if len(table) else 0
    ax.set_title("mIoU per row, mean ± sd over " + (f"{seeds} seeds" if seeds > 1 else "one seed (no spread)")
                 + "; dashed: Baseline")
    ax.legend()
    fig.tight_layout()
    return fig


def heatmap_figure(delta: pd.DataFrame, budget: int, means: pd.DataFrame | None = None, limit: float = 10.0):
    """The paper's class-wise figure: Baseline's class IoU, then each row's IoU change over it. A class that both
    the row and Baseline miss (IoU 0 in both) is "–", not a change of 0; colours saturate at +-``limit`` points."""
    import matplotlib.pyplot as plt

    shown = delta.drop(index=BASELINE, errors="ignore")
    values = shown.to_numpy(dtype=float)
    if means is not None and BASELINE in means.index:
        base = means.loc[BASELINE].to_numpy(dtype=float)
        both_missed = (means.reindex(shown.index).to_numpy(dtype=float) == 0) & (base == 0)
        values = np.where(both_missed, np.nan, values)
    else:
        base = np.full(len(CLASS_NAMES), np.nan)
    fig, (top, ax) = plt.subplots(2, 1, figsize=(13, 2.6 + 0.5 * max(1, len(shown))), layout="constrained",
                                  gridspec_kw={"height_ratios": [1, max(1, len(shown))]}, sharex=True)
    top.imshow(base[None], cmap="Greys", vmin=0, vmax=100, aspect="auto")
    top.set_yticks([0], ["Baseline IoU"])
    for j, v in enumerate(base):
        top.text(j, 0, "-" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v > 55 else "black")
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values) if values.size else np.zeros((1, len(CLASS_NAMES))), cmap=cmap,
                      vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=60, ha="right")
    ax.set_yticks(range(len(shown)), shown.index)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if np.isnan(v) else f"{v:+.1f}", ha="center", va="center", fontsize=8,
                color="white" if abs(v) > 0.6 * limit else "black")
    fig.colorbar(image, ax=[top, ax], label=f"IoU change (points, ±{limit:.0f} and beyond)", extend="both")
    top.set_title(f"Class IoU at {budget} labels: Baseline, and each row's same-seed change (– : both miss the class)")
    return fig


FIGURE_TITLES = {"study_bars": "mIoU per row, mean and seeds", "forest": "Each row against Baseline: same-seed Δ with its interval",
                 "class_iou_delta": "Class IoU: Baseline, and each row's same-seed change"}


def figure_title(name: str) -> str:
    """A figure file's heading in the HTML report: what it shows, and its budget where it has one."""
    import re

    stem, budget = re.fullmatch(r"(.+?)(?:_b(\d+))?\.png", name).groups()
    return FIGURE_TITLES.get(stem, name) + (f" ({budget} labels)" if budget else "")


def html_report(markdown_text: str, figures: dict[str, bytes]) -> str:
    """One self-contained HTML page: the report's Markdown as HTML and its PNG figures inline (MLflow shows
    an HTML artifact in place)."""
    import base64

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    images = "".join(f'<h2>{figure_title(name)}</h2><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                     for name, data in figures.items())
    # MLflow's artifact viewer is narrower than a class table: wide tables scroll inside themselves, not the page
    style = ("body{font-family:sans-serif;margin:1em;max-width:110em} table{border-collapse:collapse;margin:1em 0;display:block;"
             "overflow-x:auto;max-width:100%} td,th{border:1px solid #ccc;padding:.2em .5em;font-size:90%;white-space:nowrap}"
             " th{background:#f3f3f3} img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>segsde study</title><style>{style}</style></head>" \
           f"<body>{body}{images}</body></html>"


def write_report(records: list[dict], rows: list[str], budgets: list[int], out: Path, logger=None,
                 min_effect: float = MIN_EFFECT, sde_per_seed: bool | None = None, depth_reference: dict | None = None,
                 pairs: tuple[tuple[str, str], ...] = (), claims: dict | None = None, concurrency: int = 1) -> tuple[str, str]:
    """Write study.md, study.html, study.parquet, comparison.parquet, trials.parquet, class_iou.parquet and the
    figures under ``out`` (and into the MLflow run of ``logger``, with the comparison as metrics and the summary as
    its description); return the Markdown,
    and its summary for a terminal (the study table and the comparisons, without the class tables). ``depth_reference``:
    a constant depth's errors, against which the SDE models the trials read are checked (``sde_quality``). ``pairs``:
    (A, B) rows compared with each other as well, in the family Holm corrects. ``claims``: {claim: its comparison
    lines} answered after the comparisons (``claims.py``), their seeds' cost at ``concurrency`` trials at once."""
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [{**r, "sde/learned": learned_depth(r, depth_reference)} if r.get("sde/model") else r for r in records]
    trials = trial_frame(records)
    comparison = comparison_table(records, rows, budgets, min_effect, pairs=pairs)
    comparison.attrs["sde_per_seed"] = sde_per_seed  # which inference the rows that read the SDE model make
    table = study_table(trials, rows, budgets, comparison)
    silent = {(c.row, c.budget) for c in against_baseline(comparison).itertuples() if not c.acted}
    text = ["# Component study (mIoU %, mean ± std over seeds, same-seed Δ to Baseline)", "", markdown(table, rows, budgets, silent)]
    summary, classes, seeds = list(text), [], []
    figures = [(bar_figure(table, rows, budgets), "study_bars.png"), (forest_figure(comparison, budgets), "forest.png")]
    for b in budgets:
        means, delta, spread = class_table(trials, rows, b)
        compared, by_seed = comparison_markdown(comparison, b), seed_markdown(trials, rows, b)
        text += ["", compared, "", by_seed, "", class_markdown(means, delta, spread, b)]
        summary += ["", compared]
        seeds += ["", by_seed]
        classes.append(means.assign(budget=b).reset_index())
        figures.append((heatmap_figure(delta, b, means), f"class_iou_delta_b{b}.png"))
    if claims:
        seconds = trials.groupby("row")["seconds"].mean().to_dict() if "seconds" in trials else {}
        answered = claims_markdown(claim_verdicts(comparison, claims, seconds, concurrency), min_effect, concurrency)
        text[3:3] = ["", answered]  # after the study table: the answer first
        summary[3:3] = ["", answered]
    models = sde_models_markdown(records, depth_reference)
    text += ["", models] if models else []
    summary += ["", models] if models else []
    markdown_text = "\n".join(text) + "\n"
    atomic_write_bytes(out / "study.md", markdown_text.encode())
    frames = [("study.parquet", table), ("comparison.parquet", comparison), ("trials.parquet", trials),
              ("class_iou.parquet", pd.concat(classes) if classes else pd.DataFrame())]
    settings = {"rows": list(rows), "budgets": [int(b) for b in budgets], "min_effect": min_effect, "sde_per_seed": sde_per_seed,
                "depth_reference": depth_reference, "pairs": [list(p) for p in pairs], "claims": claims or {},
                "concurrency": concurrency}
    for name, frame in frames:
        tmp = out / f".{name}.tmp"
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if name == "trials.parquet":
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), SETTINGS: json.dumps(settings, default=float).encode()})
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(out / name)
    for fig, name in figures:
        atomic_savefig(fig, out / name)
        if logger is not None:
            logger.figure(fig, f"study/{name}")
        plt.close(fig)
    page = html_report(markdown_text, {name: (out / name).read_bytes() for _, name in figures})
    atomic_write_bytes(out / "study.html", page.encode())
    summary_text = "\n".join(summary)
    if logger is not None:
        for name in ["study.md", "study.html", *(name for name, _ in frames)]:
            logger.artifact(out / name, "study")
        # the parent run's description in the MLflow UI: the table first, the whole report one click away
        seeds_text = "\n".join(seeds)
        logger.tags({"mlflow.note.content": f"{summary_text}\n{seeds_text}\n\nThe whole report, with class IoU and figures: "
                                            "artifact `study/study.html`."})
        # rounded to what a person reads (the Parquet tables keep every digit)
        logger.metrics({f"compare/{c.row if c.reference == BASELINE else f'{c.row}-vs-{c.reference}'}/b{c.budget}/{k}":
                        round(getattr(c, k), 4 if k == "p_holm" else 2) for c in comparison.itertuples() if c.reference
                        for k in ("delta", "ci_low", "ci_high", "p_holm") if getattr(c, k) == getattr(c, k)}, step=0)
    return markdown_text, summary_text
