"""Sweep methods at matched compute, each followed by the same confirmation: which finds a winner that holds up.

Prints one JSON object. For each sweep seed, four searches of one row's settings on the profile's testbed:
TPE + ASHA (the sweep's default, ``--samples``), Optuna's GP sampler + ASHA at the same samples (it models the
observation noise: the candidate default for noisy scores), random search without early stopping at about the same
compute (``--random-samples``), and the full grid (``--grid-points`` per parameter: the reference). Each is followed by the
sweep's confirmation (the defaults and the ``--confirm-top`` best settings on fresh seeds, paired by seed with the
defaults); all runs share one storage root, so the defaults' confirmation trials of a seed run once.

Per method and seed: the search's compute (trainer steps, ASHA's stopped trials counted to their stop), the
confirmation's, the confirmed winner (or none: keep the defaults) with its paired difference to the defaults and
interval, and each confirmed setting's shrinkage (search score - confirmed mean: the winner's curse). The goal, for
TPE + ASHA and GP + ASHA each: the confirmed gain at least the lower end of the grid's best confirmed interval, with
at most 40 % of the grid's search compute; the sampler that meets it with the larger mean confirmed gain is the one
the sweep should use (a tie keeps TPE, the default). It takes hours on 2 cores (``--sweep-seeds``, ``--steps``);
``--resume`` continues it in the same ``--out`` where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from segsde.orchestration.sweep import run_sweep, sweep_config

GOAL_COMPUTE = 0.40
METHODS = ("grid", "tpe_asha", "gp_asha", "random")


def one_sweep(method: str, seed: int, args, root: Path) -> dict:
    """One search + confirmation; what it cost and what it confirmed."""
    kinds = {"tpe_asha": dict(sampler="tpe", asha=True, samples=args.samples),
             "gp_asha": dict(sampler="gp", asha=True, samples=args.samples),
             "random": dict(sampler="random", asha=False, samples=args.random_samples),
             "grid": dict(sampler="grid", asha=False, grid_points=args.grid_points)}
    sets = {"steps": args.steps} if args.steps else {}
    cfg = sweep_config(args.profile, sets=sets, row=args.row, params=tuple(args.params.split(",")), budgets=(args.budget,) if args.budget else None,
                       seed=seed, confirm_top=args.confirm_top, confirm_seeds=args.confirm_seeds, **kinds[method])
    start = time.perf_counter()
    result = run_sweep(cfg, root / f"{method}-s{seed}", storage=str(root / "storage"), experiment=f"bench-sweep-{method}-s{seed}",
                       log=lambda line: progress(f"{method} s{seed}: {line}"), resume=args.resume)
    (budget, summary), = result["budgets"].items()
    confirmed = pd.read_parquet(Path(summary["confirmation"]["report"]).with_name("confirmation.parquet"))
    settings = confirmed[confirmed.setting != "defaults"]
    best = settings.loc[settings.confirmed.idxmax()] if len(settings) else None
    winner = summary["confirmation"]["winner"]
    won = settings[settings.setting == winner].iloc[0] if winner else None
    seconds = round(time.perf_counter() - start, 1)
    progress(f"{method} s{seed}: done in {seconds:.0f} s; {summary['confirmation']['sentence']}")
    return {"method": method, "sweep_seed": seed, "budget": budget, "seconds": seconds, "resumed": args.resume,
            "search_steps": summary["steps"], "confirm_steps": summary["confirmation"]["steps"],
            "search_best": summary.get("best_miou", float("nan")) * 100, "sentence": summary["confirmation"]["sentence"],
            "winner": winner, "gain": float(won.delta) if won is not None else 0.0,
            "best_confirmed": None if best is None else {"setting": best.setting, "delta": _num(best.delta),
                                                          "ci": [_num(best.ci_low), _num(best.ci_high)]},
            "shrinkage": {s.setting: _num(s.shrinkage) for s in confirmed.itertuples()},
            "mean_shrinkage_selected": _num(settings.shrinkage.mean()), "n_confirm_seeds": args.confirm_seeds}


def progress(line: str) -> None:
    """The sweeps' own lines, on stderr (the JSON is the last thing on stdout, and in OUT/bench_sweep.json)."""
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def _num(v) -> float | None:
    return None if v is None or v != v else round(float(v), 3)


def held_against_grid(runs: list[dict], grid: list[dict], summary: dict) -> dict:
    """Whether a method's confirmed gain reached the lower end of the grid's best confirmed interval on every sweep
    seed (paired by seed), and at what share of the grid's search compute."""
    held = []
    for run, reference in zip(runs, grid):
        best = reference["best_confirmed"]
        low = best["ci"][0] if best and best["ci"][0] is not None else 0.0
        held.append(run["gain"] >= min(low, reference["gain"]))
    return {"within_grid_interval": all(held), "per_seed": held, "search_compute_vs_grid": summary["search_compute_vs_grid"],
            "compute_goal": GOAL_COMPUTE, "met": all(held) and summary["search_compute_vs_grid"] <= GOAL_COMPUTE}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--row", default="depthmix")
    parser.add_argument("--params", default="epsilon,unsup_weight")
    parser.add_argument("--budget", type=int, default=None, help="labels (default: the profile's sweep budget)")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps of every trial (default: the profile's sweep)")
    parser.add_argument("--sweep-seeds", default="0,10", help="seeds of whole sweeps (their fresh seeds follow each)")
    parser.add_argument("--samples", type=int, default=8, help="TPE + ASHA trials")
    parser.add_argument("--random-samples", type=int, default=4, help="random-search trials (about TPE + ASHA's compute)")
    parser.add_argument("--grid-points", type=int, default=3)
    parser.add_argument("--confirm-top", type=int, default=2)
    parser.add_argument("--confirm-seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="which searches (grid is the reference: always run)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_sweep"))
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out: finished searches "
                        "and confirmation trials are not rerun (then a run's seconds count only the resumed part)")
    args = parser.parse_args(argv)
    chosen = ["grid"] + [m for m in args.methods.split(",") if m != "grid"]
    if unknown := set(chosen) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    runs = [one_sweep(method, int(seed), args, args.out.absolute()) for seed in args.sweep_seeds.split(",") for method in chosen]
    by = {m: [r for r in runs if r["method"] == m] for m in chosen}
    grid_steps = np.mean([r["search_steps"] for r in by["grid"]])
    methods = {m: {"search_steps": float(np.mean([r["search_steps"] for r in rs])),
                   "search_compute_vs_grid": round(float(np.mean([r["search_steps"] for r in rs]) / grid_steps), 3),
                   "mean_confirmed_gain": round(float(np.mean([r["gain"] for r in rs])), 3),
                   "mean_shrinkage_selected": _num(np.nanmean([r["mean_shrinkage_selected"] for r in rs
                                                               if r["mean_shrinkage_selected"] is not None] or [np.nan])),
                   "winners": sum(r["winner"] is not None for r in rs)} for m, rs in by.items()}
    goal = {m: held_against_grid(by[m], by["grid"], methods[m]) for m in chosen if m.endswith("_asha")}
    met = [m for m, g in goal.items() if g["met"]]
    out = {"bench": "sweep", "profile": args.profile, "row": args.row, "params": args.params, "grid_points": args.grid_points,
           "samples": args.samples, "random_samples": args.random_samples, "machine": platform.processor() or platform.machine(),
           "methods": methods, "runs": runs, "goal": goal,
           "sampler_to_use": max(met, key=lambda m: methods[m]["mean_confirmed_gain"]) if met else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sweep.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
