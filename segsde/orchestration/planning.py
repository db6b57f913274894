"""Planning a study's seeds: how many seeds each row needs to find the profile's minimal effect (``study.min_effect``)
at 80 % power with the paired t-test of the report, at Holm's first-step level over the study's family, and what
they would cost. The noise comes from a pilot: the planned study's own finished trials (any two seeds of a row and
Baseline), else the profile's ``study.pilot_sd``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from segsde.orchestration.comparison import BASELINE, CONTROLS, comparison_table, line_name
from segsde.orchestration.statistics import ALPHA, POWER, seeds_for


def seed_plan(records: list[dict], rows: list[str], budgets: list[int], min_effect: float, cost: dict,
              pilot_sd: float | None = None, controls=CONTROLS, pairs: tuple[tuple[str, str], ...] = ()) -> pd.DataFrame:
    """One line per (row, budget) but Baseline, then one per (pair, budget): the pilot's paired sd and image variance
    (``source`` says where they come from), the seeds ``min_effect`` needs, and their compute in trial-seconds
    (``cost``: {(row, budget): seconds of one trial}, nan where unknown). A row runs as many seeds as the most any of
    its lines needs (its pairs' included), Baseline as many as its budget's most; a pair's compute is in its rows'."""
    table = comparison_table(records, rows, budgets, min_effect, controls, pairs)  # the report's pairing, seed by seed
    table = table[table.reference != ""].reset_index(drop=True)
    pilot = (table.n >= 2) & table.sd_delta.notna()
    table = pd.DataFrame({"row": [line_name(r, ref) for r, ref in zip(table.row, table.reference)], "budget": table.budget,
                          "pilot_seeds": np.where(pilot, table.n, 0), "sd": table.sd_delta.where(pilot),
                          "image_var": table.image_var.where(pilot, 0.0),
                          "source": [f"pilot, {n} seeds" if p else "" for n, p in zip(table.n, pilot)],
                          "control": table.control.astype(bool), "members": list(zip(table.row, table.reference))})
    measured = table.sd.dropna()
    pooled = float(np.sqrt((measured**2).mean())) if len(measured) else pilot_sd
    fallback = f"pooled over {len(measured)} lines" if len(measured) else "the profile's pilot_sd" if pilot_sd else ""
    missing = table.sd.isna()
    table.loc[missing, "sd"] = pooled if pooled is not None else np.nan
    table.loc[missing, "source"] = fallback or "no pilot: run two seeds first (--seeds 0,1)"
    family = int((~table.control).sum())
    alpha_family = ALPHA / max(family, 1)
    table["alpha"] = np.where(table.control, ALPHA, alpha_family)
    table["seeds"] = [seeds_for(min_effect, sd, iv, alpha=a) if sd == sd else None
                      for sd, iv, a in zip(table.sd, table.image_var, table.alpha)]
    is_pair = [ref != BASELINE for _, ref in table.members]
    for i, (row, _) in enumerate(table.members):  # a row runs the seeds its pairs need too
        if not is_pair[i]:
            lines = [j for j, (a, ref) in enumerate(table.members) if a == row or ref == row]
            need = table.seeds.iloc[lines].dropna()
            table.loc[i, "seeds"] = need.max() if len(need) else None
    table["trial_s"] = [np.nan if p else cost.get((r, b), np.nan) for p, (r, _), b in zip(is_pair, table.members, table.budget)]
    table["compute_h"] = table.seeds.astype(float) * table.trial_s / 3600
    for b in budgets:  # Baseline runs as many seeds as the line that needs most
        at = table[table.budget == b]
        most = at.seeds.dropna().max() if at.seeds.notna().any() else np.nan
        table.loc[len(table)] = {"row": BASELINE, "budget": b, "pilot_seeds": np.nan, "sd": np.nan, "image_var": np.nan,
                                 "source": "paired with every row", "control": False, "members": (BASELINE, ""),
                                 "alpha": np.nan, "seeds": most, "trial_s": cost.get((BASELINE, b), np.nan),
                                 "compute_h": most * cost.get((BASELINE, b), np.nan) / 3600}
    table.attrs.update(min_effect=min_effect, family=family, alpha_family=alpha_family)
    return table.drop(columns="members")


def plan_markdown(table: pd.DataFrame, concurrency: int) -> str:
    """The plan as a table a person reads, with the total compute and its wall time at ``concurrency``."""
    def num(v, fmt):
        return "–" if v is None or v != v else format(v, fmt)

    lines = [f"Seeds for {POWER:.0%} power to find {table.attrs['min_effect']:g} mIoU points (paired t-test; Holm over the "
             f"{table.attrs['family']} comparisons of the family: first step at α = {table.attrs['alpha_family']:.4f}; controls at "
             f"α = {ALPHA})", "",
             "| row | budget | paired sd (source) | image variance | seeds | one trial | compute |", "|---" * 7 + "|"]
    for c in table.itertuples():
        pair = " vs " in c.row
        seeds = "unreachable: the validation images' noise alone is too large" if c.seeds != c.seeds and c.sd == c.sd and c.row != BASELINE \
            else num(c.seeds, ".0f")
        lines.append(f"| {c.row}{' (control)' if c.control else ''} | {c.budget} | {num(c.sd, '.2f')} ({c.source}) | "
                     f"{num(c.image_var, '.3f')} | {seeds} | {'–' if pair else num(c.trial_s, '.0f') + ' s'} | "
                     f"{'in its rows' if pair else num(c.compute_h, '.2f') + ' h'} |")
    total = float(np.nansum(table.compute_h))
    unknown = int((table.compute_h.isna() & ~table.row.str.contains(" vs ")).sum())
    lines += ["", f"Compute: {total:.1f} trial-hours" + (f" ({unknown} rows of unknown cost left out)" if unknown else "")
              + f", about {total / concurrency:.1f} h of wall time at {concurrency} trials at once on this machine."]
    return "\n".join(lines)


def trial_costs(trials, records: list[dict]) -> dict:
    """{(row, budget): seconds of one trial}: the finished trials' own wall time, else the cost model
    (``TrainConfig.relative_cost``) scaled by the seconds per cost unit of the finished ones."""
    seconds = {}
    for t, r in zip(trials, records):
        if r.get("seconds"):
            seconds.setdefault((t.plan.row, t.plan.train.budget), []).append(float(r["seconds"]))
    measured = {k: float(np.mean(v)) for k, v in seconds.items()}
    per_unit = [float(r["seconds"]) / t.cost for t, r in zip(trials, records) if r.get("seconds") and t.cost]
    unit = float(np.median(per_unit)) if per_unit else math.nan
    return {(t.plan.row, t.plan.train.budget): measured.get((t.plan.row, t.plan.train.budget), unit * t.cost) for t in trials}


def plan_study(cfg, out: Path, storage: str | None = None, data_root=None, log=print) -> pd.DataFrame:
    """``segsde study --plan``: the seeds and compute the study's rows need, from what is cached (runs nothing)."""
    from segsde.orchestration.stages import dataset_stage
    from segsde.orchestration.study import _planned_model_stages, plan_trials, trial_record
    from segsde.profiles import data_profile
    from segsde.storage import as_location, open_root, storage_uri
    from segsde.trainer.run import train_config

    root = open_root(storage_uri(storage, Path(out).absolute()))
    configs = [train_config(cfg.profile, r, {**cfg.train, "budget": max(cfg.budgets), "seed": cfg.seeds[0]}) for r in cfg.rows]
    data = dataset_stage(data_profile(cfg.profile), root, cfg.data_seed, as_location(data_root) if data_root else None, False, True,
                         lambda _: None)
    _, sde_models, selections = _planned_model_stages((cfg.profile, configs, cfg.seeds, root, data, (), cfg.sde_per_seed), cfg)
    trials = plan_trials(cfg, data, root, sde_models, selections)
    records = [trial_record(t) for t in trials]
    table = seed_plan(records, list(cfg.rows), list(cfg.budgets), cfg.min_effect, trial_costs(trials, records), cfg.pilot_sd,
                      pairs=cfg.pairs)
    log(plan_markdown(table, cfg.concurrency))
    pilots = sum(r.get("miou") is not None for r in records)
    log(f"[study] planned from {pilots} finished trials of {len(trials)}" + (", with one SDE stage per seed besides" if cfg.sde_per_seed else "")
        + "; nothing was run")
    return table
