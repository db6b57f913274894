"""A sweep's confirmation: its best settings and the row's defaults trained again on fresh seeds, as ordinary cached
trials (the same settings are the same trial as in a study) scored on the study's validation split, each setting
paired by seed with the defaults (the report's interval, Holm over the settings). The best of many single-seed
search scores is biased upward (the winner's curse): a setting's search score minus its confirmed mean measures
that bias, and the defaults, confirmed the same way but never selected, show what it is without selection."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd

from segsde.orchestration.comparison import inaction, record_confusions
from segsde.orchestration.statistics import ALPHA, LEVEL, holm, paired_difference

DEFAULTS = "defaults"
COLUMNS = ["setting", "params", "search", "n", "confirmed", "sd", "shrinkage", "delta", "ci_low", "ci_high", "p", "p_holm",
           "method", "acted", "verdict"]


def top_settings(study: optuna.Study, k: int, defaults: dict) -> list[tuple[str, dict, float]]:
    """(label, params, search mIoU %) of the defaults and the ``k`` best complete trials whose settings differ from
    the defaults and from each other, best first. Labels name the Optuna trial (``t7``)."""
    def key(params):
        return tuple(sorted((k, round(float(v), 6)) for k, v in params.items()))

    complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None),
                      key=lambda t: -t.value)
    base = key(defaults)
    first = next((t for t in complete if key(t.params) == base), None)
    chosen, seen = [(DEFAULTS, dict(defaults), 100 * first.value if first else np.nan)], {base}
    for t in complete:
        if len(chosen) > k:
            break
        if key(t.params) not in seen:
            seen.add(key(t.params))
            chosen.append((f"t{t.number}", dict(t.params), 100 * t.value))
    return chosen


def confirm_table(records: dict[str, list[dict]], settings: list[tuple[str, dict, float]]) -> pd.DataFrame:
    """One line per setting (the defaults first): search score, confirmed mean and sd over the fresh seeds, the
    shrinkage between them, and each setting's paired difference to the defaults with its interval, Holm over the
    settings that acted, and the verdict."""
    base = records.get(DEFAULTS, [])
    base_scores = {int(r["seed"]): 100 * r["miou"] for r in base if r.get("miou") is not None}
    base_conf, groups = record_confusions(base)
    lines = []
    for label, params, search in settings:
        done = [r for r in records.get(label, []) if r.get("miou") is not None]
        scores = {int(r["seed"]): 100 * r["miou"] for r in done}
        values = list(scores.values())
        line = {"setting": label, "params": {k.removeprefix("params/"): float(v) for k, v in params.items()}, "search": search,
                "n": len(values), "confirmed": np.mean(values) if values else np.nan,
                "sd": np.std(values, ddof=1) if len(values) > 1 else np.nan, "acted": inaction(done) is None,
                "verdict": "reference" if label == DEFAULTS else (inaction(done) or "")}
        line["shrinkage"] = search - line["confirmed"]
        if label != DEFAULTS and scores and base_scores:
            paired = paired_difference(scores, base_scores, record_confusions(done)[0], base_conf, groups)
            if paired is not None:
                line.update(delta=paired.delta, method=paired.method,
                            **(dict(ci_low=paired.low, ci_high=paired.high, p=paired.p) if paired.n >= 2 else {}))
        lines.append(line)
    table = pd.DataFrame(lines).reindex(columns=COLUMNS)
    judged = table.p.notna() & table.acted
    if judged.any():
        table.loc[judged, "p_holm"] = holm(table.loc[judged, "p"].tolist())
    for i in table.index[table.setting != DEFAULTS]:
        if table.at[i, "verdict"]:
            continue
        if table.at[i, "n"] < 2 or table.at[i, "p"] != table.at[i, "p"]:
            table.at[i, "verdict"] = "too few seeds to judge"
        elif table.at[i, "p_holm"] < ALPHA and (table.at[i, "ci_low"] > 0 or table.at[i, "ci_high"] < 0):
            table.at[i, "verdict"] = "better than the defaults" if table.at[i, "delta"] > 0 else "worse than the defaults"
        else:
            table.at[i, "verdict"] = "no difference shown"
    return table


def winner(table: pd.DataFrame):
    """The confirmed winner: of the settings judged better than the defaults, the one with the largest difference;
    None when none was (keep the defaults)."""
    better = table[table.verdict == "better than the defaults"]
    return None if better.empty else better.loc[better.delta.idxmax()]


def verdict_sentence(table: pd.DataFrame) -> str:
    best = winner(table)
    silent = [s for s, acted in zip(table.setting, table.acted) if not acted]
    if best is None:
        return ("no setting beat the defaults beyond seed noise" + (f" ({', '.join(silent)} did not act)" if silent else "")
                + "; keep them")
    settings = ", ".join(f"{k} {v:.3g}" for k, v in best.params.items())
    return f"{settings} beats the defaults by {best.delta:+.1f} [{best.ci_low:+.1f}, {best.ci_high:+.1f}]"


def winner_yaml(row: str, table: pd.DataFrame) -> str:
    """The settings to carry into a study: the confirmed winner only (a ``--set`` line and a profile snippet), or a
    note to keep the row's defaults."""
    best = winner(table)
    if best is None:
        return f"# no setting of the sweep beat row {row}'s defaults beyond seed noise: keep them\n"
    sets = " ".join(f"--set {k}={v:.6g}" for k, v in best.params.items())
    body = "\n".join(f"    {k}: {v:.6g}" for k, v in best.params.items())
    return (f"# the confirmed winner of the sweep of row {row} ({best.setting}): {verdict_sentence(table)}\n"
            f"# tune/run_ablation.py {sets}\nstudy:\n  train:\n{body}\n")


def confirmation_markdown(table: pd.DataFrame, budget: int, seeds: list[int]) -> str:
    def num(v, fmt):
        return "–" if v is None or v != v else format(v, fmt)

    method = next((m for m in table.method.dropna()), "no interval: too few seeds")
    judged = int(table.p_holm.notna().sum())
    lines = [f"Confirmation at {budget} labels on fresh seeds {', '.join(map(str, seeds))}: mIoU % of each setting's search "
             "trial (one seed) and its confirmed mean ± sd; shrinkage = search − confirmed (the winner's curse); Δ to the "
             f"defaults, paired by seed, with its {100 * LEVEL:.0f} % interval ({method}), "
             + (f"p Holm-corrected over the {judged} settings that acted" if judged else "no setting judged"), "",
             "| setting | params | search | confirmed | shrinkage | Δ | 95 % interval | p (Holm) | verdict |", "|---" * 9 + "|"]
    for c in table.itertuples():
        params = ", ".join(f"{k} {v:.3g}" for k, v in c.params.items())
        confirmed = num(c.confirmed, ".2f") + (f" ± {c.sd:.2f}" if c.sd == c.sd else "")
        interval = f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]" if c.ci_low == c.ci_low and c.acted else "–"
        lines.append(f"| {c.setting} | {params} | {num(c.search, '.2f')} | {confirmed} (n={c.n}) | {num(c.shrinkage, '+.2f')} | "
                     f"{num(c.delta, '+.2f') if c.acted else '–'} | {interval} | {num(c.p_holm, '.3f')} | {c.verdict} |")
    lines += ["", f"**{verdict_sentence(table)}**"]
    return "\n".join(lines)
