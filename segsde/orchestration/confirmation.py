"""A sweep's confirmation: its best settings and the row's defaults trained again on fresh seeds, as ordinary cached
trials (the same settings are the same trial as in a study) scored on the study's validation split, each setting
paired by seed with the defaults (the report's interval, Holm over the settings). The best of many single-seed
search scores is biased upward (the winner's curse): a setting's search score minus its confirmed mean measures
that bias, and the defaults, confirmed the same way but never selected, show what it is without selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from segsde.orchestration.comparison import inaction, record_confusions
from segsde.orchestration.statistics import ALPHA, LEVEL, holm, paired_difference
from segsde.storage import Location

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


def confirm_budget(cfg, name: str, budget: int, defaults: dict, inputs: tuple, root: Location, tracking, storage, address,
                   out: Path, log, keep_checkpoints: bool, console=None) -> dict:
    """A sweep's (``cfg``: its ``SweepConfig``) defaults and ``confirm_top`` best settings of Optuna study ``name`` on the
    fresh seeds, as a grid of ordinary cached trials; their paired comparison, the winner's curse, and the settings a
    study should take (the confirmed winner only), into ``out``/sweep/``name`` and the budget's MLflow run."""
    from segsde.data.store import atomic_write_bytes
    from segsde.orchestration.study import StudyConfig, plan_trial, run_trial_grid, trial_record
    from segsde.tracking import RunLogger
    from segsde.trainer.run import train_config

    data, sde_models, selections = inputs
    settings = top_settings(optuna.load_study(study_name=name, storage=storage), cfg.confirm_top, defaults)
    trials = {}
    for label, params, _ in settings:
        for seed in cfg.fresh_seeds:
            tc = train_config(cfg.profile, cfg.row, {**cfg.train, **{k.removeprefix("params/"): v for k, v in params.items()},
                                                     "budget": budget, "seed": seed})
            selection = selections.get((tc.selection, seed)) if tc.labeled == "selection" else None
            model = sde_models.get((tc.sde_model, seed)) if tc.needs_sde else None
            trials.setdefault(label, []).append(plan_trial(cfg.profile, cfg.row, tc, data, root, model, selection, cfg.workers, cfg.gpu))
    every = [t for ts in trials.values() for t in ts]
    todo = [t for t in every if not t.done]
    log(f"[sweep] confirming {', '.join(label for label, _, _ in settings)} on seeds {list(cfg.fresh_seeds)}: "
        f"{len(todo)} trials to run, {len(every) - len(todo)} cached")
    if console is not None:
        console.watch({t.key: f"{cfg.row} b{budget} {label} s{t.plan.train.seed}" for label, ts in trials.items() for t in ts})
    as_study = StudyConfig(profile=cfg.profile, rows=(cfg.row,), budgets=(budget,), seeds=cfg.fresh_seeds,
                           concurrency=cfg.concurrency, workers=cfg.workers, gpu=cfg.gpu, train=cfg.train)
    errors = run_trial_grid(as_study, todo, root, tracking, address, log, set().union(*(t.needs for t in todo)), None,
                            keep_checkpoints, title="sweep") if todo else {}
    if any(not t.done and t.key not in errors for t in todo):
        raise KeyboardInterrupt  # Tune took the Ctrl-C and ended the trials early
    table = confirm_table({label: [trial_record(t) for t in ts] for label, ts in trials.items()}, settings)
    text = confirmation_markdown(table, budget, list(cfg.fresh_seeds))
    where = out / "sweep" / name
    where.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(where / "confirmation.md", (text + "\n").encode())
    atomic_write_bytes(where / "settings.yaml", winner_yaml(cfg.row, table).encode())
    table.assign(params=table.params.map(json.dumps)).to_parquet(where / "confirmation.parquet", index=False)
    logger = RunLogger(tracking.uri, tracking.parent_run_id)
    for file in ("confirmation.md", "confirmation.parquet", "settings.yaml"):
        logger.artifact(where / file, "sweep")
    logger.tags({"mlflow.note.content": f"{text}\n\nThe settings for a study: artifact `sweep/settings.yaml`."})
    best = winner(table)
    logger.metrics({f"confirm/{c.setting}/{k}": round(float(getattr(c, k)), 2) for c in table.itertuples()
                    for k in ("confirmed", "shrinkage", "delta") if getattr(c, k) == getattr(c, k)}, step=0)
    log(text)
    log(f"[sweep] the settings for a study: {where / 'settings.yaml'}")
    return {"sentence": verdict_sentence(table), "winner": None if best is None else best.setting,
            "shrinkage": {c.setting: c.shrinkage for c in table.itertuples()}, "report": str(where / "confirmation.md"),
            "steps": sum(t.plan.train.steps for t in every)}
